"""Finance against the chain after a Permit2 payment settled by a griefer's copy (``settled_by_copy``),
from a review of today's ledger outcomes, fixed: a resolution by a copy carries the gas our own reverted
transaction paid (``Resolution.gas``), so reconcile keeps it on the row while the hash becomes the copy's.

A copy of the gateway's pending exact-Permit2 settlement, sent by another account with a higher tip,
moves this very payment; the gateway's own transaction reverts on Permit2's used nonce, and the
settlement key pays that revert's gas. Finance must see both: the payment settled (by the copy),
and the gas the settlement key paid for its own reverted transaction (never the copy's, never 0).

Private anvil: automining is switched off to order the copy before ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3

from gateway.cli.main import main
from settlement.ledger import PaymentState
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, running_devchain
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE, SEL_APPROVE
from tests.e2e.test_attacks_gas import FUNDER, fresh_payer, send_tx, settler
from tests.e2e.test_attacks_permit2_copies import _broadcast_then, _permit2_header, _raw_send
from tests.support import chain_actions
from tests.support.ledger_rows import force_row

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("review-finance-outcomes")) as private:
        yield private


def _cli(gateway: RunningGateway, *args: str) -> tuple[int, Any]:
    env = {
        "X402GW_DEPLOYMENT_FILE": str(gateway.settings.deployment_file),
        "X402GW_CATALOG": ",".join(str(p) for p in gateway.settings.catalog),
        "X402GW_DATABASE_URL": gateway.settings.database_url,
    }
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code in (0, 1), (args, result.exit_code, result.output)
    return result.exit_code, json.loads(result.stdout)


def _cost(chain: Devchain, tx_hash: str) -> int:
    receipt = chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def _copied(start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
            path: str) -> tuple[RunningGateway, str, str, str, httpx.Response]:
    """An EOA payer (Permit2 approved) pays ``path`` by exact-Permit2; while the gateway's settlement is
    in the pool, a griefer sends the very same calldata with a higher tip. (gateway, payer, our hash,
    the copy's hash, the answer)."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key = fresh_payer(chain, 1)
    address = Account.from_key(key).address
    chain_actions.transfer(chain.w3, plain.address, chain.key(FUNDER), address, 2 * PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    griefer = "0x" + bytes(Account.create().key).hex()
    chain_actions.set_eth(chain.w3, Account.from_key(griefer).address)
    ours: list[str] = []
    copies: list[str] = []

    def copy(tx: Any) -> None:
        ours.append("0x" + bytes(tx["hash"]).hex().removeprefix("0x"))
        copies.append(_raw_send(chain.w3, griefer, str(tx["to"]), bytes(tx["input"]), tip=10 * 10**9))

    answer = _broadcast_then(chain, gateway, address, lambda: httpx.get(
        f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": _permit2_header(gateway, key, plain.address, path)},
        timeout=90), copy)
    assert chain.w3.eth.get_transaction_receipt(copies[0])["status"] == 1  # type: ignore[arg-type]
    assert chain.w3.eth.get_transaction_receipt(ours[0])["status"] == 0  # type: ignore[arg-type]
    assert chain.w3.eth.get_transaction(ours[0])["from"].lower() == settler(chain).lower()  # type: ignore[arg-type]
    return gateway, address, ours[0], copies[0], answer


def test_gas_of_our_reverted_settlement_stays_in_the_books_when_reconcile_finds_the_copy(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Hole: a crash after the broadcast (hash written ahead, receipt never recorded) leaves the row open
    with our own transaction's hash and no gas. ``x402gw reconcile`` resolves it (``resolve_upto``,
    settlement/schemes/upto.py:327-328, ``settled_by_copy``) and writes the *copy's* hash over ours:
    our reverted transaction is no longer named anywhere in the ledger. ``ledger backfill-gas`` then
    reads the copy's receipt, sees another sender (settlement/finance/gas.py:89-93) and records 0 wei.
    The settlement key paid our revert's gas on chain; ``ledger summary`` says the payment cost no gas
    (revenue net of gas overstated). The running gateway's request path keeps that gas on the row
    (upto.py:385-387); the resolution must too.
    Correct: after reconcile + backfill-gas, the row's gas is our reverted transaction's receipt cost."""
    gateway, payer, ours, copy, answer = _copied(start_gateway, chain, upstream, tmp_path, "/q/FINA")
    assert answer.status_code == 200, answer.text[:300]
    [row] = [r for r in gateway.ledger.all() if r.payer and r.payer.lower() == payer.lower()]
    ours_cost = _cost(chain, ours)
    # The request path: settled by the copy, our revert's gas on the row (this part holds today).
    assert row.state == PaymentState.SETTLED and row.tx_hash.lower() == copy.lower() and row.gas_cost == ours_cost

    # The same payment as a crash after the broadcast leaves it: open, our hash written ahead, no gas yet.
    force_row(gateway.ledger, row.id, state=PaymentState.PENDING, tx_hash=ours, gas_used=None, gas_price=None,
              gas_cost=None, block_number=None)
    code, report = _cli(gateway, "reconcile", "--json")
    assert [(r["after"], r["reason"]) for r in report["resolved"]] == [("settled", "settled_by_copy")], report
    assert code == 0 and report["agree"] is True and report["matched"] == 1, report  # the payment itself agrees
    _, backfill = _cli(gateway, "ledger", "backfill-gas", "--json")
    _, summary = _cli(gateway, "ledger", "summary", "--format", "json")
    [group] = summary["groups"]
    resolved = next(r for r in gateway.ledger.all() if r.id == row.id)
    assert int(group["gas_wei"]) == ours_cost and group["gas_missing"] == 0, (
        f"the settlement key ({settler(chain)}) paid {ours_cost} wei for its reverted settlement {ours} of payment "
        f"{row.id}; after `x402gw reconcile` (resolved settled_by_copy, tx_hash now the griefer's {copy}) and "
        f"`ledger backfill-gas` ({backfill}), `ledger summary` reports gas_wei={group['gas_wei']} "
        f"gas_missing={group['gas_missing']}; the row: tx_hash={resolved.tx_hash} gas_cost={resolved.gas_cost}: "
        f"gas spent on chain, recorded nowhere")
