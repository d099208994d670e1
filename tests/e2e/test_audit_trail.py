"""The audit trail of real paid calls on anvil: every decision, in order, chained, and verifiable."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from catalog import load_catalogs
from gateway.app import create_app
from gateway.cli.main import main
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.audit import AuditTrail, AuditWriter, StoredRecord
from settlement.schema import open_ledger
from tests.conftest import Devchain, demo_catalog
from tests.e2e.test_paid_call import pay, receipt_of

PAYER = 4  # anvil account used by this module's payments


@dataclass
class AuditedGateway:
    url: str
    database_url: str
    writer: AuditWriter

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def events(self, response: httpx.Response) -> list[StoredRecord]:
        """The records of the request that got ``response``, once everything submitted is written."""
        assert self.writer.drain(30), "the audit writer did not catch up"
        return self.writer.trail.for_request(response.headers["x-request-id"])


@pytest.fixture
def audited(tmp_path: Path, devchain: Devchain, upstream: str) -> Iterator[AuditedGateway]:
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    settings = Settings(catalog=[demo_catalog(tmp_path, upstream)], deployment_file=devchain.deployment_file,
                        database_url=database_url, receipt_timeout_seconds=10)
    ledger = open_ledger(database_url)
    writer = AuditWriter(AuditTrail(database_url))
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger, audit=writer)
    assert app.state.audit is writer
    with ThreadServer(app) as server:
        yield AuditedGateway(server.url, database_url, writer)
    ledger.close()


def data(record: StoredRecord) -> dict[str, Any]:
    parsed = json.loads(record.data)
    assert isinstance(parsed, dict)
    return parsed


def test_a_paid_call_leaves_challenge_verified_attempt_settled_response(
    audited: AuditedGateway, devchain: Devchain
) -> None:
    payer = devchain.address(PAYER)
    with audited.client() as client:
        challenge, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
    assert paid.status_code == 200, paid.text

    offered = audited.events(challenge)
    assert [r.event for r in offered] == ["challenge_issued", "response"]
    assert data(offered[0]) == {"amount": "2000", "asset": devchain.token, "network": "eip155:31337",
                                "payTo": data(offered[0])["payTo"]}
    assert data(offered[1])["status"] == 402 and data(offered[1])["outcome"] == "challenged"
    assert {(r.tool, r.payer) for r in offered} == {("get_quote", None)}

    records = audited.events(paid)
    assert [r.event for r in records] == ["payment_verified", "upstream_attempt", "settled", "response"]
    assert {(r.request_id, r.payer, r.tool) for r in records} == {(paid.headers["x-request-id"], payer, "get_quote")}
    assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + 4))  # one transaction
    verified, attempt, settled, response = (data(r) for r in records)
    assert verified["amount"] == "2000" and verified["nonce"].startswith("0x")
    assert attempt["url"].endswith("/api/v1/quote/AAPL") and attempt["status"] == 200
    assert attempt["attempt"] == 0 and attempt["method"] == "GET" and attempt["latencyMs"] >= 0
    assert settled["transaction"] == receipt_of(paid).transaction and settled["paymentId"] is not None
    assert response["status"] == 200 and response["outcome"] == "settled" and response["path"] == "/quotes/AAPL"

    code, out = _cli("audit", "verify", "--database-url", audited.database_url, "--json")
    assert code == 0 and json.loads(out)["intact"], out


def test_refusals_and_upstream_failures_are_recorded_with_their_reason(
    audited: AuditedGateway, devchain: Devchain
) -> None:
    with audited.client() as client:
        _, rejected, _ = pay(client, devchain, "GET", "/quotes/ORCL", payer=PAYER, tamper={"value": 1999})
        _, failed, _ = pay(client, devchain, "GET", "/reports/500", payer=PAYER)
        malformed = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": "%%% not base64 %%%"})
        invalid = client.get("/quotes/not-a-ticker")
    assert (rejected.status_code, failed.status_code, malformed.status_code, invalid.status_code) == (402, 500, 400, 422)

    records = audited.events(rejected)
    assert [r.event for r in records] == ["payment_rejected", "response"]
    assert data(records[0])["reason"] == "invalid_exact_evm_payload_authorization_value_mismatch"

    records = audited.events(failed)
    assert [r.event for r in records] == ["payment_verified", "upstream_attempt", "response"]
    assert data(records[1])["status"] == 500
    assert data(records[2])["outcome"] == "upstream_error" and data(records[2])["upstreamStatus"] == 500

    assert [(r.event, data(r).get("reason")) for r in audited.events(malformed)] == [
        ("payment_rejected", "payment_header_not_base64"), ("response", "payment_header_not_base64")]
    assert [(r.event, data(r)["status"], data(r)["reason"]) for r in audited.events(invalid)] == [
        ("response", 422, "invalid_arguments")]


def test_query_strings_and_payment_headers_stay_out_of_the_trail(
    audited: AuditedGateway, devchain: Devchain
) -> None:
    with audited.client() as client:
        _, paid, header = pay(client, devchain, "GET", "/weather", payer=PAYER, params={"city": "SecretCityXYZ"})
    assert paid.status_code == 200, paid.text
    [attempt] = [r for r in audited.events(paid) if r.event == "upstream_attempt"]
    assert "?" not in data(attempt)["url"]
    code, exported = _cli("audit", "export", "--database-url", audited.database_url)
    assert code == 0 and exported.count("\n") >= 4
    signature = json.loads(base64.b64decode(header))["payload"]["signature"]
    for secret in ("SecretCityXYZ", header, signature):
        assert secret not in exported


def test_tampering_with_a_paid_calls_settlement_record_is_named(audited: AuditedGateway, devchain: Devchain) -> None:
    with audited.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/MSFT", payer=PAYER)
    [settled] = [r for r in audited.events(paid) if r.event == "settled"]
    trail = AuditTrail(audited.database_url)
    with trail.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_records SET data = replace(data, '0x', '0xdead') WHERE seq = ?", (settled.seq,))
    trail.close()
    code, out = _cli("audit", "verify", "--database-url", audited.database_url)
    assert code == 1
    assert f"TAMPERED hash_mismatch: seq {settled.seq} (id {settled.id})" in out


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_safety_verdicts_name_the_rule(tmp_path: Path, devchain: Devchain, upstream: str) -> None:
    """A budget that allows one call: the first records an allow verdict, the second the rule that refused it."""
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    settings = Settings(catalog=[demo_catalog(tmp_path, upstream)], deployment_file=devchain.deployment_file,
                        database_url=database_url, budget_per_payer="0.002/1d")
    writer = AuditWriter(AuditTrail(database_url))
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=open_ledger(database_url), audit=writer)
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        _, first, _ = pay(client, devchain, "GET", "/quotes/AUDA", payer=PAYER)
        _, second, _ = pay(client, devchain, "GET", "/quotes/AUDB", payer=PAYER)
        assert (first.status_code, second.status_code) == (200, 403)
        assert writer.drain(30)
        allowed = [data(r) for r in writer.trail.for_request(first.headers["x-request-id"]) if r.event == "safety_verdict"]
        denied = [data(r) for r in writer.trail.for_request(second.headers["x-request-id"]) if r.event == "safety_verdict"]
    assert allowed == [{"stage": "budgets", "verdict": "allow", "rules": ["per_payer"]}]
    assert denied == [{"stage": "budgets", "verdict": "deny", "rule": "per_payer", "reason": "budget_exceeded"}]
