"""Attack review of the insider fixes (345a0b2, 5c3f813): ways around them, and what they broke.

The insider has SQL access to the ledger database, and so to the audit trail in it, which has no
secret: ``AuditTrail.append`` (what ``ledger refunds --approve`` itself calls) extends the chain
with records that verify. Each test makes the edit, runs what the operator runs (``GET
/receipts``, ``x402gw ledger refunds --pay``, ``x402gw audit verify`` / ``export``) and asserts on
chain balances, signed receipts and exit codes.

Found by a bypass review (2026-12-05, evening); every test here failed on the code it reviewed, and
each is fixed so:

- a `settled` record that disagrees with its row fell back to the chain (which knows no tool) and
  signed the edited tool: a record of the payment that disagrees is a refusal (409
  ``receipt_unconfirmed``); the chain is asked alone only when the trail has no record of it;
- the receipt signed facts the `settled` record did not carry: the record carries method, path and
  fingerprint too (what the request held), receipts and ``audit verify`` compare them (and verify
  the request id) with the row (``ledger_mismatch``);
- a paid refund reopened by SQL was paid again: every payer of a refund writes ``refund_paid``;
  ``ledger refunds --pay`` refuses one the trail records paid (``refund_already_paid``) and
  ``audit verify`` names the row owing it again (``refund_reopened``);
- an appended ``refund_owed`` got a delivered answer refunded: a refund named under a request whose
  own earlier ``response`` record says the answer was delivered is ``refund_contradicted`` (not
  paid, named by verify);
- an appended `settled` record got a voided payment a signed receipt: a receipt needs the chain's
  evidence of the charge as well as the trail's record. What is not detected, and cannot be from
  inside the database: the trail has no secret, so records appended at its tail that are
  consistent with each other verify as intact (``audit verify --anchor`` pins only what came before
  the anchor); the chain is what refuses here;
- ``audit verify``'s ledger check died on a paymentId out of range (SQLite traceback, PostgreSQL
  exit 2): such an id is ``ledger_row_missing``, never read, and the ledger failing to answer is one
  problem (``ledger_unreadable``) after the walk, never hiding the chain's;
- deeply nested JSON (RecursionError) killed verify and export: it is data that is not JSON;
- ``GET /receipts/0x<tx>`` checked the evidence (a writer flush, an RPC call) before its replay
  guard: the guard comes first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from eth_account import Account
from eth_account.messages import encode_defunct
from sqlalchemy import text

from gateway.cli.main import main
from gateway.surfaces.receipt_evidence import SettlementEvidence
from gateway.surfaces.receipts import challenge_message
from settlement.audit import REFUND_OWED, AuditEvent, AuditTrail, AuditWriter
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from tests.conftest import Devchain, GatewayFactory, RunningGateway, demo_catalog, fresh_database
from tests.e2e.test_attacks_insider import PAYER, cli, fetch_receipt, paid_call
from tests.e2e.test_exactly_once import UPFRONT_TOOL, signed
from tests.e2e.test_paid_call import pay
from tests.support.ledger_rows import force_row

pytestmark = pytest.mark.e2e

REFUND_KEY = 9  # the payee's account pays refunds back


def audited_gateway(start_gateway: GatewayFactory, tmp_path: Path, **overrides: object) -> tuple[RunningGateway, AuditWriter]:
    url = f"sqlite:///{tmp_path / 'audited.sqlite3'}"
    writer = AuditWriter(AuditTrail(url))
    gateway = start_gateway(database_url=url, app_options={"audit": writer}, **overrides)
    return gateway, writer


def verify_exit(gateway: RunningGateway) -> tuple[int, str]:
    result = cli(gateway, "audit", "verify")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------- receipts

def test_a_row_moved_to_another_tool_gets_a_signed_receipt_naming_the_new_tool(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The trail's `settled` record of the payment exists and names get_quote. The insider moves the
    row to get_weather. The evidence check finds the record disagreeing (tool), then falls back to
    the chain, which knows nothing of tools, and the gateway signs a receipt attesting get_weather:
    a record that contradicts the row is treated like no record at all."""
    gateway, writer = audited_gateway(start_gateway, tmp_path)
    row = paid_call(gateway, devchain, "/quotes/RTOOL")
    assert writer.drain(30)
    assert any(r.event == "settled" for r in writer.trail.for_request(row.request_id))
    force_row(gateway.ledger, row.id, tool="get_weather", path="/weather")

    with gateway.client() as client:
        answer = fetch_receipt(client, devchain.key(PAYER), row.id)

    assert (answer.status_code, answer.json().get("error")) == (409, "receipt_unconfirmed"), (
        f"payment {row.id} moved to get_weather: {answer.status_code} {answer.text[:300]}; "
        "the trail's settled record says get_quote")


def test_a_receipt_signs_edited_facts_the_settled_record_does_not_carry(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The receipt signs resourceUrl (path), method, argumentsDigest, requestId, issuedAt and
    blockNumber; the `settled` record carries none of them. The insider rewrites the path and the
    arguments digest of a settled payment (same tool): the gateway signs a receipt for a resource
    the payer never bought, and `audit verify` says the trail and ledger agree."""
    gateway, writer = audited_gateway(start_gateway, tmp_path)
    row = paid_call(gateway, devchain, "/quotes/REAL")
    assert writer.drain(30)
    forged_path, forged_digest = "/quotes/FAKE", "0x" + "ab" * 32
    force_row(gateway.ledger, row.id, path=forged_path, fingerprint=forged_digest)

    with gateway.client() as client:
        answer = fetch_receipt(client, devchain.key(PAYER), row.id)
    code, output = verify_exit(gateway)

    assert (answer.status_code, answer.json().get("error")) == (409, "receipt_unconfirmed"), (
        f"receipt of payment {row.id} after its path and digest were edited: {answer.status_code} {answer.text[:300]}")
    assert code == 1 and "ledger_mismatch" in output and "path: /quotes/REAL -> /quotes/FAKE" in output \
        and "fingerprint:" in output, f"audit verify exit {code}: {output}"


# -------------------------------------------------------------------------------------- refunds

def _refunded_upfront_failure(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path,
                              upstream: str) -> tuple[RunningGateway, AuditWriter, int, int]:
    """An upfront call whose upstream failed: settled, refund owed (and its refund_owed record)."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway, writer = audited_gateway(start_gateway, tmp_path, catalog=catalog)  # no refund key: owed
    with gateway.client() as client:
        header = signed(client, devchain, "/paid-first/reports/500", payer=PAYER)
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and failed.headers["x402gw-refund"] == "owed"
    [row] = [r for r in gateway.ledger.all() if r.request_id == failed.headers["x-request-id"]]
    assert row.refund_owed and row.refunded_at is None
    assert writer.drain(30)
    assert REFUND_OWED in {r.event for r in writer.trail.for_request(row.request_id)}
    return gateway, writer, row.id, int(row.refund_owed)


def test_a_paid_refund_reopened_by_sql_is_paid_again(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """A refund owed and paid by `ledger refunds --pay`. The insider clears refunded_at and
    refund_tx: the row owes it again, the pipeline's refund_owed record (payment id, amount) still
    names it, and the next routine `--pay` sends the payer the same refund a second time. Nothing
    records that the refund was paid (no refund_paid audit record), so nothing refuses it, and
    afterwards reconcile and audit verify see a consistent refunded row. Fixed: `--pay` writes
    refund_paid before the ledger's record, refuses a refund the trail records paid
    (refund_already_paid), and verify names the row owing it again (refund_reopened)."""
    gateway, _, payment_id, owed = _refunded_upfront_failure(start_gateway, devchain, tmp_path, upstream)
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    first = cli(gateway, "ledger", "refunds", "--json", "--pay", X402GW_REFUND_KEY=devchain.key(REFUND_KEY))
    assert first.exit_code == 0, first.output
    assert devchain.balance(payer) == before + owed
    force_row(gateway.ledger, payment_id, refunded_at=None, refund_tx=None)

    again = cli(gateway, "ledger", "refunds", "--json", "--pay", X402GW_REFUND_KEY=devchain.key(REFUND_KEY))

    assert again.exit_code in (0, 1), again.output
    outcomes = [line["outcome"] for line in json.loads(again.stdout)["refunds"]]
    assert devchain.balance(payer) == before + owed, (
        f"payment {payment_id}'s refund of {owed} was paid {(devchain.balance(payer) - before) // owed} times "
        f"(second run: {outcomes})")
    assert outcomes == ["refund_already_paid"] and again.exit_code == 1, again.output
    code, output = verify_exit(gateway)
    assert code == 1 and "refund_reopened" in output and f"payment {payment_id}" in output, output


def test_a_refund_owed_record_appended_by_the_insider_gets_a_delivered_answer_refunded(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The fix pays only refunds the audit trail names; the trail has no secret, so the insider who
    writes refund_owed into a delivered payment's row also appends the matching refund_owed record
    (AuditTrail.append, what the CLI's --approve does). The trail's own records say that request
    answered 200 and settled; `ledger refunds --pay` pays the refund anyway and `audit verify`
    (with the ledger check) reports the trail intact: the money moved and nothing names it. Fixed: a
    refund named under a request whose own earlier response record says it was delivered is
    refund_contradicted, for --pay and for verify. Not caught (no secret in the trail): an insider
    who also appends a forged response record, or names a request that has none."""
    gateway, writer = audited_gateway(start_gateway, tmp_path)
    row = paid_call(gateway, devchain, "/quotes/APPND")
    assert writer.drain(30)
    events = {r.event: json.loads(r.data) for r in writer.trail.for_request(row.request_id)}
    assert events["response"]["status"] == 200 and events["response"]["outcome"] == "settled"
    force_row(gateway.ledger, row.id, refund_owed=row.amount, refund_reason="upstream_error")
    insider = AuditTrail(gateway.settings.database_url)
    insider.append([AuditEvent(row.request_id, REFUND_OWED,
                               {"paymentId": row.id, "amount": str(row.amount), "reason": "upstream_error"},
                               payer=row.payer, tool=row.tool)])
    insider.close()
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)

    result = cli(gateway, "ledger", "refunds", "--json", "--pay", X402GW_REFUND_KEY=devchain.key(REFUND_KEY))
    code, output = verify_exit(gateway)

    assert result.exit_code in (0, 1), result.output
    outcomes = [line["outcome"] for line in json.loads(result.stdout)["refunds"]]
    refunded = devchain.balance(payer) - before
    assert refunded == 0 and outcomes == ["refund_contradicted"], (
        f"the refund account paid {refunded} back for payment {row.id}, whose answer was delivered "
        f"(response 200 in the trail), on an appended refund_owed record ({outcomes})")
    assert code == 1 and "refund_contradicted" in output, f"audit verify exit {code}: {output}"


# ----------------------------------------------------------------- appended records (no secret)

def test_a_voided_payment_set_to_settled_with_an_appended_settled_record_gets_a_signed_receipt(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The earlier finding (a voided row set to settled gets a receipt) is fixed by asking the
    trail for the payment's `settled` record. The insider appends one (AuditTrail.append: the chain
    has no secret), with exactly the row's facts: the receipt key signs a charge the chain never
    made, and `audit verify` (chain and ledger check) reports the trail intact. Fixed for the
    receipt: it needs the chain's evidence (this payment's authorization used in its transaction) as
    well as the trail's record. Adjusted: verify is not asserted on. The appended record is
    consistent with the row and the chain before it, and the trail has no secret: records appended
    at the tail are not detected from inside the database (an external `audit verify --anchor`
    pins only what came before it); the chain, where this payment never moved, is what refuses."""
    gateway, writer = audited_gateway(start_gateway, tmp_path)
    real = paid_call(gateway, devchain, "/quotes/APPST")
    with gateway.client() as client:
        _, failed, _ = pay(client, devchain, "GET", "/reports/500", payer=PAYER)
    assert failed.status_code == 500
    [row] = [r for r in gateway.ledger.all() if r.request_id == failed.headers["x-request-id"]]
    assert row.state == PaymentState.VOIDED
    assert writer.drain(30)
    force_row(gateway.ledger, row.id, state=PaymentState.SETTLED, tx_hash=real.tx_hash, block_number=real.block_number)
    insider = AuditTrail(gateway.settings.database_url)
    insider.append([AuditEvent(row.request_id, "settled", {
        "transaction": real.tx_hash, "network": row.network, "paymentId": row.id, "tool": row.tool,
        "owner": row.owner, "payer": row.payer, "payTo": row.pay_to, "asset": row.asset, "nonce": row.nonce,
        "amount": str(row.amount)}, payer=row.payer, tool=row.tool)])
    insider.close()

    with gateway.client() as client:
        forged = fetch_receipt(client, devchain.key(PAYER), row.id)

    assert (forged.status_code, forged.json().get("error")) == (409, "receipt_unconfirmed"), (
        f"signed receipt for voided payment {row.id} (its nonce never used on chain, transaction "
        f"{real.tx_hash} is payment {real.id}'s): {forged.status_code} {forged.text[:300]}")


def test_a_replayed_receipt_request_by_transaction_costs_no_evidence_check(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET /receipts/0x<tx>`` checked the evidence (a writer flush, an RPC call per row) before its
    replay guard: each replay of one signed request cost the gateway both before the 401. The guard
    comes first now: the replay is refused without asking the trail or the chain."""
    gateway, writer = audited_gateway(start_gateway, tmp_path)
    row = paid_call(gateway, devchain, "/quotes/RPLAY")
    assert writer.drain(30)
    checks: list[int] = []
    original = SettlementEvidence.confirmed

    async def counted(self: SettlementEvidence, payment: Payment) -> bool:
        checks.append(payment.id)
        return await original(self, payment)

    monkeypatch.setattr(SettlementEvidence, "confirmed", counted)
    with gateway.client() as client:
        signer = client.get("/.well-known/x402").json()["receipts"]["signer"]
        timestamp = int(time.time())
        message = encode_defunct(text=challenge_message(signer, row.tx_hash, timestamp))
        headers = {"X402GW-Receipt-Time": str(timestamp),
                   "X402GW-Receipt-Signature": "0x" + bytes(Account.sign_message(message, devchain.key(PAYER)).signature).hex()}
        first = client.get(f"/receipts/{row.tx_hash}", headers=headers)
        assert first.status_code == 200, first.text
        assert checks == [row.id]
        replays = [client.get(f"/receipts/{row.tx_hash}", headers=headers) for _ in range(3)]

    assert {(r.status_code, r.json()["error"]) for r in replays} == {(401, "receipt_auth_replayed")}
    assert checks == [row.id], f"each replay checked the evidence again: {checks}"


# ------------------------------------------------------------ audit verify / export on edited data

@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        with fresh_database("insider_review") as url:
            yield url


def _trail_with_settled_records(url: str) -> AuditTrail:
    open_ledger(url).close()  # the ledger's tables: verify compares settled records with payments
    trail = AuditTrail(url)
    for n in range(1, 5):
        trail.append([AuditEvent(f"req{n}", "settled", {"paymentId": n, "transaction": "0x" + f"{n:064x}"})])
    return trail


def test_audit_verify_names_a_settled_record_whose_payment_id_is_out_of_range(any_url: str) -> None:
    """The insider edits one `settled` record's paymentId to 2**64. That edit breaks the hash chain
    (hash_mismatch), but the new ledger check reads the payment by that id first: SQLite raises
    OverflowError (a traceback, no report) and PostgreSQL a DataError (exit 2, "the audit trail
    cannot be read"): the tampering, and every other problem the walk found, goes unnamed."""
    trail = _trail_with_settled_records(any_url)
    with trail.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET data = :d WHERE seq = 2"),
                     {"d": json.dumps({"paymentId": 2**64, "transaction": "0x" + "22" * 32})})
    trail.close()

    verify = CliRunner().invoke(main, ["audit", "verify", "--database-url", any_url])

    assert verify.exception is None or isinstance(verify.exception, SystemExit), (
        f"audit verify crashed on the edited record: {verify.exception!r}")
    assert verify.exit_code == 1 and "seq 2" in verify.output, verify.output


def test_audit_verify_and_export_name_a_record_edited_to_deeply_nested_json(tmp_path: Path) -> None:
    """The fix for data that is not JSON catches ValueError; JSON nested deeper than the parser's
    recursion limit raises RecursionError. The insider writes `[[[...]]]` into a `settled` record:
    `audit verify` (the ledger check parses settled records) and `audit export` (to_json) die with
    a traceback instead of naming seq 2 (--no-ledger names it: hash_mismatch)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trail = _trail_with_settled_records(url)
    with trail.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET data = :d WHERE seq = 2"), {"d": "[" * 100_000 + "]" * 100_000})
    trail.close()
    out = tmp_path / "trail.jsonl"

    plain = CliRunner().invoke(main, ["audit", "verify", "--no-ledger", "--database-url", url])
    assert plain.exit_code == 1 and "hash_mismatch: seq 2" in plain.output, plain.output
    verify = CliRunner().invoke(main, ["audit", "verify", "--database-url", url])
    export = CliRunner().invoke(main, ["audit", "export", "--database-url", url, "-o", str(out)])

    crashed = {name: repr(result.exception) for name, result in (("verify", verify), ("export", export))
               if result.exception is not None and not isinstance(result.exception, SystemExit)}
    assert not crashed, f"crashed on the edited record: {crashed}"
    assert verify.exit_code == 1 and "seq 2" in verify.output, verify.output
