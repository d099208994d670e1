"""``x402gw ledger refunds [--pay]`` against a real anvil and gateway: a refund the gateway could not
pay (no refund key, a refused broadcast) is paid later, once; a refund whose transaction landed is
only recorded; one whose transaction reverted is paid again; one whose transaction the node does not
know is left unless the operator says so; two runs at once pay once. Each test asserts the payer's
balance on chain and the ledger row, not only the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from eth_account import Account
from sqlalchemy import update

from gateway.cli.main import main
from settlement.chain.client import SEL_TRANSFER
from settlement.ledger import Payment
from settlement.ledger.models import utcnow
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, demo_catalog
from tests.e2e.test_exactly_once import UPFRONT_TOOL, signed
from tests.e2e.test_paid_call import receipt_of

pytestmark = pytest.mark.e2e

PAYER = 5
REFUND = 4000  # the upfront tool's price, owed back when its upstream fails


def env_of(gateway: RunningGateway, refund_key: str | None) -> dict[str, str]:
    env = {
        "X402GW_DEPLOYMENT_FILE": str(gateway.settings.deployment_file),
        "X402GW_CATALOG": ",".join(str(p) for p in gateway.settings.catalog),
        "X402GW_DATABASE_URL": gateway.settings.database_url,
    }
    if refund_key is not None:
        env["X402GW_REFUND_KEY"] = refund_key
    return env


def run_refunds(gateway: RunningGateway, *args: str, refund_key: str | None = None) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["ledger", "refunds", "--json", *args], env=env_of(gateway, refund_key))
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def the_row(gateway: RunningGateway, payment_id: int) -> Payment:
    row = gateway.ledger.get(payment_id)
    assert row is not None
    return row


def age_claim(gateway: RunningGateway, payment_id: int, age: timedelta) -> None:
    """The row's last write (its refund claim) ``age`` ago, as if the claim had been made then."""
    table = Payment.__table__
    with gateway.ledger.engine.begin() as connection:
        connection.execute(update(table).where(table.c.id == payment_id).values(updated_at=utcnow() - age))


def send_refund_transfer(devchain: Devchain, to: str, amount: int, *, gas: int | None = None) -> str:
    """A plain transfer from the payee's account (anvil 9), as a refund payer would send one."""
    data = SEL_TRANSFER + bytes.fromhex(to[2:].rjust(64, "0")) + amount.to_bytes(32, "big")
    tx: dict[str, Any] = {"from": PAY_TO, "to": devchain.token, "data": data}
    if gas is not None:
        tx["gas"] = gas
    sent = devchain.w3.eth.send_transaction(tx)  # type: ignore[arg-type]
    devchain.w3.eth.wait_for_transaction_receipt(sent, timeout=60)  # mined (a busy node may take a moment)
    return "0x" + sent.hex().removeprefix("0x")


@pytest.fixture
def owed(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str) -> tuple[RunningGateway, Payment]:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog)  # no refund key: the refund stays owed
    with gateway.client() as client:
        header = signed(client, devchain, "/paid-first/reports/500", payer=PAYER)
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and receipt_of(failed).success
    assert failed.headers["x402gw-refund"] == "owed"
    row = next(r for r in gateway.ledger.all() if r.path == "/paid-first/reports/500")
    assert row.refund_owed == REFUND and row.refund_tx is None and row.refunded_at is None
    return gateway, row


def test_a_refund_left_owed_is_listed_then_paid_once(owed: tuple[RunningGateway, Payment], devchain: Devchain) -> None:
    gateway, row = owed
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)

    code, listed = run_refunds(gateway)
    assert code == 0 and listed["stillOwed"] == 1 and listed["stillOwedAmount"] == str(REFUND)
    [line] = listed["refunds"]
    assert line == {"payment": row.id, "network": row.network, "payer": payer, "amount": str(REFUND),
                    "reason": "upstream_error", "status": "unpaid", "refundTransaction": None, "outcome": "listed"}
    assert devchain.balance(payer) == before  # listing pays nothing

    code, paid = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 0 and paid["stillOwed"] == 0
    [line] = paid["refunds"]
    assert line["outcome"] == "paid" and line["status"] == "unpaid"
    assert devchain.balance(payer) == before + REFUND
    refunded = the_row(gateway, row.id)
    assert refunded.refund_tx == line["refundTransaction"] and refunded.refunded_at is not None
    assert devchain.w3.eth.get_transaction_receipt(refunded.refund_tx)["status"] == 1

    code, again = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 0 and again["refunds"] == [] and again["stillOwed"] == 0
    assert devchain.balance(payer) == before + REFUND  # never twice


def test_the_text_report_names_each_refund_and_its_amount(owed: tuple[RunningGateway, Payment], devchain: Devchain) -> None:
    gateway, row = owed
    result = CliRunner().invoke(main, ["ledger", "refunds"], env=env_of(gateway, None))
    assert result.exit_code == 0, result.output
    assert f"payment {row.id}: 0.004 (4000 atomic units) to {devchain.address(PAYER)}" in result.output
    assert "(upstream_error): unpaid" in result.output
    assert "1 of 1 refunds still owed (4000 atomic units)" in result.output


def test_a_refund_whose_transaction_landed_is_recorded_without_paying_again(
    owed: tuple[RunningGateway, Payment], devchain: Devchain
) -> None:
    """The gateway sent the refund and died before recording it paid: the chain has it."""
    gateway, row = owed
    payer = devchain.address(PAYER)
    tx_hash = send_refund_transfer(devchain, payer, REFUND)
    assert gateway.ledger.record_refund_tx(row.id, tx_hash)
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 0
    [line] = report["refunds"]
    assert (line["status"], line["outcome"], line["refundTransaction"]) == ("landed", "recorded", tx_hash)
    assert devchain.balance(payer) == before  # nothing sent: it had landed already
    refunded = the_row(gateway, row.id)
    assert refunded.refund_tx == tx_hash and refunded.refunded_at is not None


def test_a_refund_whose_transaction_reverted_is_paid_again(owed: tuple[RunningGateway, Payment], devchain: Devchain) -> None:
    gateway, row = owed
    payer = devchain.address(PAYER)
    reverted = send_refund_transfer(devchain, payer, 10**30, gas=100_000)  # more than the account holds
    assert devchain.w3.eth.get_transaction_receipt(reverted)["status"] == 0
    assert gateway.ledger.record_refund_tx(row.id, reverted)
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 0
    [line] = report["refunds"]
    assert (line["status"], line["outcome"]) == ("reverted", "paid") and line["refundTransaction"] != reverted
    assert devchain.balance(payer) == before + REFUND
    assert the_row(gateway, row.id).refund_tx == line["refundTransaction"]


def test_a_refund_whose_transaction_the_node_does_not_know_is_left_unless_told(
    owed: tuple[RunningGateway, Payment], devchain: Devchain
) -> None:
    """It may still land from another node's pool: paying again could pay twice."""
    gateway, row = owed
    payer = devchain.address(PAYER)
    lost = "0x" + "5e" * 32
    assert gateway.ledger.record_refund_tx(row.id, lost)
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 1 and report["stillOwed"] == 1
    assert (report["refunds"][0]["status"], report["refunds"][0]["outcome"]) == ("unknown", "left")
    assert devchain.balance(payer) == before and the_row(gateway, row.id).refund_tx == lost

    code, report = run_refunds(gateway, "--pay", "--include-unknown", refund_key=devchain.key(9))
    assert code == 1 and report["refunds"][0]["outcome"] == "too_recent"  # it may be on its way still
    assert devchain.balance(payer) == before

    age_claim(gateway, row.id, timedelta(hours=1))  # long quiet: nothing of the gateway's sends it now
    code, report = run_refunds(gateway, "--pay", "--include-unknown", refund_key=devchain.key(9))
    assert code == 0 and report["refunds"][0]["outcome"] == "paid"
    assert devchain.balance(payer) == before + REFUND


def test_a_refused_broadcast_releases_its_claim_and_a_later_run_pays(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """The gateway's refund account has no gas: the node refuses the refund, which reads unpaid
    (not unknown) and is paid by the command with a funded key."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    empty = Account.create().key.hex()
    gateway = start_gateway(catalog=catalog, refund_key=empty)
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        header = signed(client, devchain, "/paid-first/reports/500", payer=PAYER)
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and failed.headers["x402gw-refund"] == "owed"
    row = next(r for r in gateway.ledger.all() if r.path == "/paid-first/reports/500")
    assert row.refund_owed == REFUND and row.refund_tx is None  # the claim was released
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", refund_key=empty)  # the same empty account: refused again
    assert code == 1 and report["refunds"][0]["outcome"] == "failed: chain_rpc_error"
    assert the_row(gateway, row.id).refund_tx is None and devchain.balance(payer) == before

    code, report = run_refunds(gateway, "--pay", refund_key=devchain.key(9))
    assert code == 0 and report["refunds"][0]["outcome"] == "paid"
    assert devchain.balance(payer) == before + REFUND


def test_two_runs_at_once_pay_a_refund_once(owed: tuple[RunningGateway, Payment], devchain: Devchain) -> None:
    """Two operators (two processes) run --pay together: one claims the refund, the other cannot. The
    other may also read the refund after its transaction landed but before the first recorded it: it
    then records nothing new (recorded_elsewhere)."""
    gateway, row = owed
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    env = {**os.environ, **env_of(gateway, devchain.key(9))}
    command = [sys.executable, "-m", "gateway.cli.main", "ledger", "refunds", "--pay", "--json"]

    def run(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    assert sorted(r.returncode for r in results) in ([0, 0], [0, 1]), [r.stderr for r in results]
    outcomes = sorted(line["outcome"] for r in results for line in json.loads(r.stdout)["refunds"])
    assert outcomes.count("paid") == 1 and set(outcomes) <= {"paid", "claimed_elsewhere", "left", "recorded", "recorded_elsewhere"}
    assert devchain.balance(payer) == before + REFUND  # once, whichever way they interleaved
    assert the_row(gateway, row.id).refunded_at is not None


def test_bad_invocations_are_clear_errors(owed: tuple[RunningGateway, Payment]) -> None:
    gateway, _ = owed
    no_key = CliRunner().invoke(main, ["ledger", "refunds", "--pay"], env=env_of(gateway, None))
    assert no_key.exit_code == 2 and "X402GW_REFUND_KEY" in no_key.output and "Traceback" not in no_key.output
    unknown_alone = CliRunner().invoke(main, ["ledger", "refunds", "--include-unknown"], env=env_of(gateway, None))
    assert unknown_alone.exit_code == 2 and "needs --pay" in unknown_alone.output
    bad_key = CliRunner().invoke(main, ["ledger", "refunds", "--pay"], env=env_of(gateway, "0xnot-a-key"))
    assert bad_key.exit_code == 2 and "not-a-key" not in bad_key.output and "Traceback" not in bad_key.output
