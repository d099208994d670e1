"""Attack review: the insider with database access, and the records finance relies on.

THREATS.md: an insider who can run SQL edits ledger or audit rows to hide or alter a payment, and
"the hash chain must name the record". Each test makes one edit an insider could make on a real
gateway's database (SQLite or PostgreSQL, payments settled on anvil), then runs what finance and the
operator run (``x402gw audit verify`` / ``audit export``, ``x402gw reconcile``, ``ledger refunds
--pay``, ``GET /receipts/...``) and asserts that the edit is named, or refused, rather than passed
as clean, paid out, signed for, or answered with a traceback.

Found by a review (2026-12-05); all of them failed before these fixes:

- one transfer backing two settled rows: reconcile consumes a transfer once; a second row naming the
  same authorization (payer and nonce compared case-insensitively) is ``duplicate_in_ledger``;
- a row whose payTo, or transaction and block, are not the transfer's: ``payee_mismatch``,
  ``transaction_mismatch`` (reconcile);
- a row moved to another tool: the ``settled`` audit record carries the row's facts (tool, owner,
  payer, payTo, amount, asset, nonce, transaction) and ``audit verify`` compares each with its row
  (``ledger_mismatch``; ``settlement.audit.ledger_check``);
- a refund written into a delivered payment's row: the pipeline records each refund it owes
  (``refund_owed``) and ``ledger refunds --pay`` pays only those (``refund_unaudited`` otherwise;
  since the bypass review, never one whose request's response record says it was delivered, even
  approved: ``refund_contradicted``);
- a refund marked paid by SQL: reconcile reads the refund transactions of refunded rows
  (``refund_unpaid`` when one did not pay the payer);
- a receipt for a row set to settled: ``GET /receipts/{id}`` needs the trail's ``settled`` record
  of that payment or its settlement on chain (409 ``receipt_unconfirmed``);
- data that is not JSON, a time that is not a time: ``audit export`` writes the stored text
  (``dataText``), ``audit verify`` names the record (``hash_mismatch``, ``unreadable``), never a
  traceback.

(A lone surrogate in an audit event, the review's tenth finding: tests/settlement/audit/test_audit_bad_events.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from eth_account import Account
from eth_account.messages import encode_defunct
from sqlalchemy import insert, select, text

from gateway.cli.main import main
from gateway.surfaces.receipts import challenge_message
from settlement.audit import AuditEvent, AuditTrail, AuditWriter
from settlement.ledger import Payment, PaymentState
from settlement.ledger.models import utcnow
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, demo_catalog, fresh_database
from tests.e2e.test_exactly_once import UPFRONT_TOOL, signed
from tests.e2e.test_paid_call import pay
from tests.support.ledger_rows import force_row

pytestmark = pytest.mark.e2e

PAYER = 3
ACCOMPLICE = "0x000000000000000000000000000000000000dEaD"  # where an insider says the money went


# ---------------------------------------------------------------------------------------- helpers

def env_of(gateway: RunningGateway, **extra: str) -> dict[str, str]:
    return {
        "X402GW_DEPLOYMENT_FILE": str(gateway.settings.deployment_file),
        "X402GW_CATALOG": ",".join(str(p) for p in gateway.settings.catalog),
        "X402GW_DATABASE_URL": gateway.settings.database_url,
        **extra,
    }


def cli(gateway: RunningGateway, *args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env_of(gateway, **env))


def run_reconcile(gateway: RunningGateway, start: int) -> tuple[int, dict[str, Any]]:
    result = cli(gateway, "reconcile", "--json", "--from-block", str(start))
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def named_in(report: dict[str, Any], payment_id: int) -> bool:
    """Whether any disagreement list of a reconcile report names this payment."""
    lists = ("missing_on_chain", "amount_mismatch", "state_mismatch", "still_open", "duplicate_in_ledger",
             "payee_mismatch", "transaction_mismatch", "refund_unpaid")
    return any(item.get("payment_id") == payment_id for name in lists for item in report[name])


def paid_call(gateway: RunningGateway, devchain: Devchain, path: str) -> Payment:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", path, payer=PAYER)
    assert paid.status_code == 200, paid.text
    [row] = [r for r in gateway.ledger.all() if r.request_id == paid.headers["x-request-id"]]
    assert row.state == PaymentState.SETTLED and row.tx_hash
    return row


def fetch_receipt(client: httpx.Client, key: str, payment_id: int, *, earlier: int = 0) -> httpx.Response:
    """GET /receipts/{id}, signed by the payer's wallet ``earlier`` seconds ago (within the skew: two
    requests in one second are two different signed messages)."""
    signer = client.get("/.well-known/x402").json()["receipts"]["signer"]
    timestamp = int(time.time()) - earlier
    message = encode_defunct(text=challenge_message(signer, payment_id, timestamp))
    signature = "0x" + bytes(Account.sign_message(message, key).signature).hex()
    return client.get(f"/receipts/{payment_id}",
                      headers={"X402GW-Receipt-Time": str(timestamp), "X402GW-Receipt-Signature": signature})


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database("insider") as url:
        yield url


# ------------------------------------------------------------------------- reconcile vs the books

def test_one_transfer_on_chain_cannot_back_two_settled_rows(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    """The insider copies a settled payment into a second row, its payer spelled in lower case (the
    unique key (network, asset, payer, nonce) compares case-sensitively): two settled rows, twice the
    revenue in `ledger summary` and `ledger export`, one transfer on chain. Reconcile matches the one
    transfer to both rows and reports the books agree."""
    gateway = start_gateway()
    start = devchain.w3.eth.block_number + 1
    row = paid_call(gateway, devchain, "/quotes/DUPE")
    table = Payment.__table__
    with gateway.ledger.engine.begin() as conn:
        values = dict(conn.execute(select(table).where(table.c.id == row.id)).mappings().one())
        values.pop("id")
        values.update(request_id="forged-copy", payer=row.payer.lower())
        inserted = conn.execute(insert(Payment).values(**values)).inserted_primary_key
        assert inserted is not None
        copy_id = inserted[0]
    assert sum(r.amount for r in gateway.ledger.all() if r.state == PaymentState.SETTLED) == 2 * row.amount

    code, report = run_reconcile(gateway, start)

    assert report["chain_payments"] == 1
    assert code == 1 and report["agree"] is False, (
        f"one transfer backs two settled rows ({row.id}, {copy_id}); reconcile says matched={report['matched']}, agree")
    assert named_in(report, copy_id) or named_in(report, row.id)


def test_reconcile_names_a_settled_row_whose_pay_to_the_transfer_did_not_pay(
    start_gateway: GatewayFactory, devchain: Devchain, pg_url: str
) -> None:
    """PostgreSQL. The insider rewrites a settled row's payTo (an accomplice's address: the ledger, the
    export and the payer's signed receipt now say the money went there). Reconcile reads transfers to
    every payTo the ledger names and matches on (payer, nonce) alone: the transfer to the real payTo
    matches the row that says another payTo, and the books 'agree'."""
    gateway = start_gateway(database_url=pg_url)
    start = devchain.w3.eth.block_number + 1
    row = paid_call(gateway, devchain, "/quotes/PAYTO")
    force_row(gateway.ledger, row.id, pay_to=ACCOMPLICE)

    code, report = run_reconcile(gateway, start)

    assert report["chain_payments"] == 1
    assert code == 1 and named_in(report, row.id), (
        f"payment {row.id} says payTo {ACCOMPLICE}, the chain paid {PAY_TO}; reconcile: agree={report['agree']}")


def test_reconcile_names_a_settled_row_whose_transaction_is_not_the_settlement(
    start_gateway: GatewayFactory, devchain: Devchain
) -> None:
    """The insider points a settled row at another transaction (another payment's settlement): the
    export and the signed receipt now cite a transaction that did not move this payment. Reconcile
    never compares the row's transaction (nor its block) with the transfer it matched."""
    gateway = start_gateway()
    start = devchain.w3.eth.block_number + 1
    first = paid_call(gateway, devchain, "/quotes/TXA")
    second = paid_call(gateway, devchain, "/quotes/TXB")
    assert first.tx_hash != second.tx_hash
    force_row(gateway.ledger, first.id, tx_hash=second.tx_hash, block_number=second.block_number)

    code, report = run_reconcile(gateway, start)

    assert report["chain_payments"] == 2
    assert code == 1 and named_in(report, first.id), (
        f"payment {first.id} cites {second.tx_hash}, which settled payment {second.id}; reconcile: agree={report['agree']}")


# ------------------------------------------------------------- edits the hash chain never names

def test_a_ledger_row_moved_to_another_tool_is_named_by_the_audit_chain_or_reconcile(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The insider moves a settled payment to another tool (revenue per tool and owner is what finance
    pays out on). The audit chain recorded the payment (payment_verified, settled, with its tool and
    payment id), but nothing compares the ledger with it: `audit verify` says intact, reconcile
    agrees, and `ledger summary` credits the other tool."""
    url = f"sqlite:///{tmp_path / 'audited.sqlite3'}"
    writer = AuditWriter(AuditTrail(url))
    gateway = start_gateway(database_url=url, app_options={"audit": writer})
    start = devchain.w3.eth.block_number + 1
    row = paid_call(gateway, devchain, "/quotes/MOVE")
    assert writer.drain(30)
    [settled] = [r for r in writer.trail.for_request(row.request_id) if r.event == "settled"]
    assert settled.tool == "get_quote" and json.loads(settled.data)["paymentId"] == row.id
    force_row(gateway.ledger, row.id, tool="get_weather", path="/weather")

    verify = cli(gateway, "audit", "verify", "--json")
    assert verify.exception is None or isinstance(verify.exception, SystemExit), verify.output
    code, report = run_reconcile(gateway, start)

    audit_names_it = verify.exit_code == 1 and str(row.id) in verify.output
    assert audit_names_it or named_in(report, row.id), (
        f"payment {row.id} (get_quote in the audit chain) now reads get_weather in the ledger; "
        f"audit verify exit {verify.exit_code}, reconcile agree={report['agree']}")


def test_an_insider_made_refund_on_a_delivered_answer_is_not_paid(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """The payer paid and got its answer (the audit chain says: settled, response 200). The insider
    writes `refund_owed` on the row; `ledger refunds --pay` checks only that the charge is on chain
    (it is: the payment was real) and sends the payer its money back from the refund account."""
    url = f"sqlite:///{tmp_path / 'audited.sqlite3'}"
    writer = AuditWriter(AuditTrail(url))
    gateway = start_gateway(database_url=url, app_options={"audit": writer})
    row = paid_call(gateway, devchain, "/quotes/REFD")
    assert writer.drain(30)
    events = {r.event: json.loads(r.data) for r in writer.trail.for_request(row.request_id)}
    assert events["response"]["status"] == 200 and events["response"]["outcome"] == "settled"
    assert not any("refund" in name for name in events)
    force_row(gateway.ledger, row.id, refund_owed=row.amount, refund_reason="upstream_error")
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)

    result = cli(gateway, "ledger", "refunds", "--json", "--pay", X402GW_REFUND_KEY=devchain.key(9))

    assert result.exit_code in (0, 1), result.output
    outcomes = [line["outcome"] for line in json.loads(result.stdout)["refunds"]]
    assert devchain.balance(payer) == before, (
        f"the refund account paid {devchain.balance(payer) - before} back for a delivered answer "
        f"(outcomes {outcomes}); the audit chain names no refund for payment {row.id}")
    assert outcomes == ["refund_unaudited"]

    # An id owing nothing stops the run. An approval of this one is recorded, and still not paid: the
    # trail's own response record says the answer was delivered (refund_contradicted; the bypass
    # review, tests/e2e/test_attacks_insider_bypasses.py). An approval that pays: the next test.
    unknown = cli(gateway, "ledger", "refunds", "--pay", "--approve", str(row.id + 1000), X402GW_REFUND_KEY=devchain.key(9))
    assert unknown.exit_code != 0 and "refund_not_owed" in unknown.output and devchain.balance(payer) == before
    approved = cli(gateway, "ledger", "refunds", "--json", "--pay", "--approve", str(row.id), X402GW_REFUND_KEY=devchain.key(9))
    assert approved.exit_code == 1, approved.output
    assert [line["outcome"] for line in json.loads(approved.stdout)["refunds"]] == ["refund_contradicted"]
    assert devchain.balance(payer) == before
    records = [r for r in writer.trail.for_request(row.request_id) if r.event == "refund_approved"]
    assert len(records) == 1 and json.loads(records[0].data)["paymentId"] == row.id


class _NoTrail:
    """An audit sink that keeps nothing: a gateway as before its trail named refunds."""

    def submit(self, events: Sequence[AuditEvent]) -> None:
        pass

    async def close(self) -> None:
        pass


def test_a_refund_the_trail_never_named_is_paid_once_a_person_approves_it(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """An upfront call whose upstream failed on a gateway that kept no audit trail (as before the
    trail named refunds): its refund is owed and unnamed, so `--pay` leaves it (refund_unaudited).
    A person approves it by id: the approval goes into the trail first, then it is paid, and the
    payment recorded there (refund_paid)."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog, app_options={"audit": _NoTrail()})  # no refund key: owed, unnamed
    with gateway.client() as client:
        header = signed(client, devchain, "/paid-first/reports/500", payer=PAYER)
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and failed.headers["x402gw-refund"] == "owed"
    [row] = [r for r in gateway.ledger.all() if r.request_id == failed.headers["x-request-id"]]
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)

    left = cli(gateway, "ledger", "refunds", "--json", "--pay", X402GW_REFUND_KEY=devchain.key(9))
    assert [line["outcome"] for line in json.loads(left.stdout)["refunds"]] == ["refund_unaudited"], left.output
    approved = cli(gateway, "ledger", "refunds", "--json", "--pay", "--approve", str(row.id), X402GW_REFUND_KEY=devchain.key(9))

    assert approved.exit_code == 0, approved.output
    assert devchain.balance(payer) == before + int(row.refund_owed or 0)
    trail = AuditTrail(gateway.settings.database_url)
    events = [r.event for r in trail.for_request(row.request_id)]
    trail.close()
    assert events == ["refund_approved", "refund_paid"], events


def test_a_refund_marked_paid_by_sql_is_still_reported_owed(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """An upfront tool settled, then its upstream failed: its refund is owed. The insider marks the
    refund paid (refunded_at, and a refund transaction: the payment's own settlement, real and
    successful, which moved nothing to the payer). `ledger refunds` no longer lists it (it reads
    only rows without refunded_at) and reconcile never looks at refunds: the debt to the payer is
    gone from every report while the payer was never paid back."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog)  # no refund key: the refund stays owed
    start = devchain.w3.eth.block_number + 1
    with gateway.client() as client:
        header = signed(client, devchain, "/paid-first/reports/500", payer=PAYER)
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and failed.headers["x402gw-refund"] == "owed"
    [row] = [r for r in gateway.ledger.all() if r.request_id == failed.headers["x-request-id"]]
    assert row.refund_owed and row.refunded_at is None
    listed = cli(gateway, "ledger", "refunds", "--json")
    assert json.loads(listed.stdout)["stillOwed"] == 1
    force_row(gateway.ledger, row.id, refund_tx=row.tx_hash, refunded_at=utcnow())

    listed = cli(gateway, "ledger", "refunds", "--json")
    code, report = run_reconcile(gateway, start)

    assert listed.exit_code in (0, 1), listed.output
    refunds = json.loads(listed.stdout)
    assert refunds["stillOwed"] == 1 or code == 1, (
        f"payment {row.id}'s refund of {row.refund_owed} is recorded paid by {row.tx_hash} (its own settlement, "
        f"which paid the payer nothing): ledger refunds {refunds}, reconcile agree={report['agree']}")


def test_no_signed_receipt_for_a_payment_the_chain_never_settled(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    """A payment whose upstream failed is voided: nothing moved, no receipt. The insider sets the row
    to settled with a real transaction (another payment's), and the gateway signs a receipt for it:
    the receipt key attests a charge the chain never made and the audit chain never recorded."""
    url = f"sqlite:///{tmp_path / 'audited.sqlite3'}"
    writer = AuditWriter(AuditTrail(url))
    gateway = start_gateway(database_url=url, app_options={"audit": writer})
    real = paid_call(gateway, devchain, "/quotes/RCPT")
    with gateway.client() as client:
        _, failed, _ = pay(client, devchain, "GET", "/reports/500", payer=PAYER)
        assert failed.status_code == 500
        [row] = [r for r in gateway.ledger.all() if r.request_id == failed.headers["x-request-id"]]
        assert row.state == PaymentState.VOIDED
        assert fetch_receipt(client, devchain.key(PAYER), row.id).status_code == 409
        assert writer.drain(30)
        assert "settled" not in {r.event for r in writer.trail.for_request(row.request_id)}
        force_row(gateway.ledger, row.id, state=PaymentState.SETTLED, tx_hash=real.tx_hash,
                  block_number=real.block_number)

        forged = fetch_receipt(client, devchain.key(PAYER), row.id, earlier=5)

    assert forged.status_code != 200, (
        f"the gateway signed a receipt for payment {row.id} (voided; its nonce never used on chain): "
        f"{forged.json()['payload']}")


# ------------------------------------------------------------- tampered rows: named, not a crash

def test_audit_export_names_a_record_whose_data_is_not_json(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL. The insider overwrites a record's data with text that is not JSON. `audit verify`
    names it (hash_mismatch), but `audit export` (what is handed to an auditor) dies half-way with a
    JSONDecodeError traceback: the evidence of the edit cannot be exported."""
    trail = AuditTrail(pg_url)
    for n in range(5):
        trail.append([AuditEvent(f"req{n}", "settled", {"paymentId": n, "transaction": "0x" + f"{n:064x}"})])
    with trail.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET data = 'payment was never here' WHERE seq = 3"))
    trail.close()
    out = tmp_path / "trail.jsonl"

    verify = CliRunner().invoke(main, ["audit", "verify", "--database-url", pg_url])
    assert verify.exit_code == 1 and "hash_mismatch: seq 3" in verify.output, verify.output
    export = CliRunner().invoke(main, ["audit", "export", "--database-url", pg_url, "-o", str(out)])

    assert export.exception is None or isinstance(export.exception, SystemExit), (
        f"audit export crashed on the edited record: {export.exception!r}")
    assert "seq 3" in export.output or (out.exists() and len(out.read_text().splitlines()) == 5)


def test_audit_verify_names_a_record_whose_time_is_unreadable(tmp_path: Path) -> None:
    """SQLite keeps whatever text an UPDATE writes into a DATETIME column. The insider writes
    garbage into one record's time: `audit verify` dies with a ValueError traceback instead of
    naming the record (exit 1, `seq 3`)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trail = AuditTrail(url)
    for n in range(5):
        trail.append([AuditEvent(f"req{n}", "settled", {"paymentId": n})])
    with trail.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET recorded_at = 'yesterday' WHERE seq = 3"))
    trail.close()

    verify = CliRunner().invoke(main, ["audit", "verify", "--database-url", url])

    assert verify.exception is None or isinstance(verify.exception, SystemExit), (
        f"audit verify crashed on the edited record: {verify.exception!r}")
    assert verify.exit_code == 1 and "seq 3" in verify.output, verify.output
