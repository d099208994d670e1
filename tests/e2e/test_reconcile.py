"""``x402gw reconcile`` against a real anvil: payments made through a gateway agree with the chain;
a deleted ledger row, a transfer made behind the gateway's back, a row the chain never saw and a
wrong amount are each reported, with exit code 1; open rows are resolved first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from eth_abi import encode as abi_encode
from sqlalchemy import delete

from gateway.cli.main import main
from gateway.devkit.payer import Payer
from settlement.chain.client import SEL_TRANSFER_WITH_AUTHORIZATION
from settlement.ledger import Payment, PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of
from tests.e2e.test_paid_call import pay
from tests.support.ledger_rows import force_row

pytestmark = pytest.mark.e2e

PAYER = 6
OUTSIDER = 7  # signs an authorization that never goes through the gateway
SUBMITTER = 8  # submits it on chain


def run_reconcile(gateway: RunningGateway, start: int, *extra: str) -> tuple[int, dict[str, Any]]:
    env = {
        "X402GW_DEPLOYMENT_FILE": str(gateway.settings.deployment_file),
        "X402GW_CATALOG": ",".join(str(p) for p in gateway.settings.catalog),
        "X402GW_DATABASE_URL": gateway.settings.database_url,
    }
    result = CliRunner().invoke(main, ["reconcile", "--json", "--from-block", str(start), *extra], env=env)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def paid_calls(gateway: RunningGateway, devchain: Devchain, symbols: list[str]) -> None:
    with gateway.client() as client:
        for symbol in symbols:
            _, paid, _ = pay(client, devchain, "GET", f"/quotes/{symbol}", payer=PAYER)
            assert paid.status_code == 200, paid.text


def transfer_behind_the_gateway(gateway: RunningGateway, devchain: Devchain) -> str:
    """An authorization to payTo signed by a payer and submitted on chain by someone else."""
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/TSLA"))
    payment = Payer(devchain.key(OUTSIDER)).sign(offer.accepts[0]).payload
    auth, signature = payment["authorization"], bytes.fromhex(payment["signature"][2:])
    calldata = SEL_TRANSFER_WITH_AUTHORIZATION + abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
        [auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
         bytes.fromhex(auth["nonce"][2:]), signature[64], signature[:32], signature[32:64]],
    )
    tx = devchain.w3.eth.send_transaction({"from": devchain.address(SUBMITTER), "to": devchain.token, "data": calldata})
    receipt = devchain.w3.eth.wait_for_transaction_receipt(tx, timeout=30)
    assert receipt["status"] == 1
    return "0x" + bytes(tx).hex().removeprefix("0x")


def test_reconcile_agrees_then_reports_each_disagreement(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    gateway = start_gateway()
    start = devchain.w3.eth.block_number + 1  # the session's anvil has other tests' payments before this
    paid_calls(gateway, devchain, ["AAPL", "MSFT", "IBM", "SAP"])
    rows = gateway.ledger.all()
    assert [r.state for r in rows] == [PaymentState.SETTLED] * 4

    # A row left open by a crash (its transaction did land): reconcile resolves it, then they agree.
    force_row(gateway.ledger, rows[3].id, state=PaymentState.PENDING)
    code, report = run_reconcile(gateway, start)
    assert code == 0, report
    assert report["agree"] is True
    assert report["matched"] == 4 and report["chain_payments"] == 4 and report["ledger_settled"] == 4
    assert [(r["payment_id"], r["before"], r["after"]) for r in report["resolved"]] == [
        (rows[3].id, "pending", "settled")
    ]
    assert report["pay_to"] == [PAY_TO.lower()]
    assert report["ranges"]["eip155:31337"]["from_block"] == start

    # Now break it four ways.
    with gateway.ledger.engine.begin() as conn:
        conn.execute(delete(Payment).where(Payment.id == rows[0].id))
    force_row(gateway.ledger, rows[1].id, amount=rows[1].amount + 1)
    ghost = gateway.ledger.record_verified(
        request_id="ghost", owner="acme-legacy", tool="get_quote", method="GET", path="/quotes/X",
        payer=devchain.address(PAYER), pay_to=PAY_TO, amount=2000, network="eip155:31337", asset=devchain.token,
        nonce="0x" + "11" * 32, valid_before=2_000_000_000, authorization="{}",
    )
    force_row(gateway.ledger, ghost.id, state=PaymentState.SETTLED, tx_hash="0x" + "22" * 32, block_number=start)
    outsider_tx = transfer_behind_the_gateway(gateway, devchain)

    code, report = run_reconcile(gateway, start)

    assert code == 1
    assert report["agree"] is False
    assert sorted(t["tx_hash"] for t in report["missing_in_ledger"]) == sorted([rows[0].tx_hash.lower(), outsider_tx.lower()])
    outsider = next(t for t in report["missing_in_ledger"] if t["tx_hash"] == outsider_tx.lower())
    assert outsider["payer"] == devchain.address(OUTSIDER).lower() and outsider["amount_atomic"] == "2000"
    assert [r["payment_id"] for r in report["missing_on_chain"]] == [ghost.id]
    [mismatch] = report["amount_mismatch"]
    assert (mismatch["payment_id"], mismatch["amount_atomic"], mismatch["chain"]["amount_atomic"]) == (
        rows[1].id, str(rows[1].amount + 1), str(rows[1].amount)
    )
    assert report["matched"] == 2 and report["still_open"] == [] and report["state_mismatch"] == []

    # A payTo nobody paid has nothing to disagree about.
    code, report = run_reconcile(gateway, start, "--pay-to", "0x000000000000000000000000000000000000dEaD")
    assert code == 0, report
    assert report["ledger_settled"] == 0 and report["chain_payments"] == 0


def test_reconcile_without_a_chain_exits_2(tmp_path: Path) -> None:
    env = {"X402GW_DEPLOYMENT_FILE": str(tmp_path / "none.json"),
           "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'l.sqlite3'}"}
    result = CliRunner().invoke(main, ["reconcile", "--json"], env=env)
    assert result.exit_code == 2
    assert "x402gw devchain" in result.output
