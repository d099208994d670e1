"""Pending settlements are followed to their outcome in the background: a broadcast whose receipt
did not come before its request answered (503 ``settlement_pending``) is resolved against the chain
while nobody resends it, so the ledger (and its webhooks) follow the chain. Attack: a payer who
cancels its authorization while its settlement is pending gets nothing served and is charged
nothing, and the row fails on its own. Real anvil with automining off, a gateway on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json
from tests.conftest import PAY_TO, Devchain, GatewayFactory, body_json, running_devchain, upstream_hits
from tests.e2e.test_exactly_once import PAYER, PRICE, assert_ledger_matches_chain, signed, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: these tests switch automining off and on."""
    with running_devchain(tmp_path_factory.mktemp("chain")) as private:
        yield private


def pending_call(start_gateway: GatewayFactory, chain: Devchain, symbol: str) -> tuple[Any, str, int]:
    """A paid call answered 503 settlement_pending (its transaction waits in the pool); the gateway,
    its payment header and the row's id."""
    gateway = start_gateway(deployment_file=chain.deployment_file, receipt_timeout_seconds=0.5,
                            resolve_pending_seconds=0.1)
    with gateway.client() as client:
        header = signed(client, chain, f"/quotes/{symbol}")
        pending = client.get(f"/quotes/{symbol}", headers={"PAYMENT-SIGNATURE": header})
    assert pending.status_code == 503 and body_json(pending)["error"] == "settlement_pending", pending.text
    [row] = [r for r in gateway.ledger.all() if r.path == f"/quotes/{symbol}"]
    assert row.state == PaymentState.PENDING
    return gateway, header, row.id


def test_a_pending_settlement_is_settled_in_the_ledger_when_mined_without_a_resend(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, manual_mining: Callable[[], None]
) -> None:
    before = chain.balance(PAY_TO)
    gateway, header, payment_id = pending_call(start_gateway, chain, "FOLW")
    manual_mining()
    row = wait_for(lambda: (r := gateway.ledger.get(payment_id)) is not None and r.state == PaymentState.SETTLED and r,
                   "the background resolver to settle the row")
    assert row.block_number is not None and chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 1
    assert_ledger_matches_chain(gateway.ledger, chain, before)
    with gateway.client() as client:  # the payer's resend gets what it bought, once
        served = client.get("/quotes/FOLW", headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200 and served.headers["x402gw-replay"] == "true"
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/FOLW") == 1


def _cancel(chain: Devchain, payer_key: str, nonce: str) -> None:
    """The payer's own cancelAuthorization, with a higher tip than the gateway's settlement so it is
    mined first in the next block."""
    signed_cancel = Account.sign_typed_data(payer_key, full_message={
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in (("name", "string"), ("version", "string"),
                                                                   ("chainId", "uint256"), ("verifyingContract", "address"))],
            "CancelAuthorization": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "CancelAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": 31337, "verifyingContract": chain.token},
        "message": {"authorizer": Account.from_key(payer_key).address, "nonce": nonce},
    })
    selector = bytes.fromhex("5a049a70")  # cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)
    payer = Account.from_key(payer_key).address
    data = selector + bytes.fromhex(payer[2:].rjust(64, "0")) + bytes.fromhex(nonce[2:]) + signed_cancel.v.to_bytes(32, "big") \
        + signed_cancel.r.to_bytes(32, "big") + signed_cancel.s.to_bytes(32, "big")
    chain.w3.eth.send_transaction({"from": payer, "to": chain.token, "data": data, "gas": 100_000,
                                   "maxPriorityFeePerGas": 10**9, "maxFeePerGas": 10**11})


def test_a_payer_cancelling_while_its_settlement_is_pending_gets_nothing_and_the_row_fails(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, manual_mining: Callable[[], None], tmp_path: Path
) -> None:
    before = chain.balance(PAY_TO)
    gateway, header, payment_id = pending_call(start_gateway, chain, "CNCL")
    nonce = decode_header_json(header)["payload"]["authorization"]["nonce"]
    _cancel(chain, chain.key(PAYER), nonce)
    manual_mining()
    row = wait_for(lambda: (r := gateway.ledger.get(payment_id)) is not None and r.state == PaymentState.FAILED and r,
                   "the background resolver to fail the row")
    assert row.error_reason == "authorization_canceled"  # its AuthorizationCanceled log found
    assert chain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 0  # our settlement reverted
    assert chain.balance(PAY_TO) == before  # nothing moved
    with gateway.client() as client:  # nothing is served for it, ever
        again = client.get("/quotes/CNCL", headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 402 and body_json(again)["error"] == "invalid_exact_evm_nonce_already_used", again.text
    assert_ledger_matches_chain(gateway.ledger, chain, before)


def test_a_pending_settlement_dropped_from_the_pool_is_sent_again_and_settles(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, manual_mining: Callable[[], None]
) -> None:
    """The node forgets our pending transaction (dropped from its pool) long after its request
    answered: the background resolver sends the same signed transaction again, so its nonce is no
    gap for every later settlement, and the payment settles once."""
    before = chain.balance(PAY_TO)
    gateway, header, payment_id = pending_call(start_gateway, chain, "DROP")
    row = gateway.ledger.get(payment_id)
    assert row is not None and row.tx_hash is not None
    chain.w3.provider.make_request("anvil_dropTransaction", [row.tx_hash])  # type: ignore[arg-type]
    wait_for(lambda: chain.w3.provider.make_request(  # type: ignore[arg-type]
        "eth_getTransactionByHash", [row.tx_hash]).get("result") is not None, "the transaction to be sent again")
    manual_mining()
    settled = wait_for(lambda: (r := gateway.ledger.get(payment_id)) is not None and r.state == PaymentState.SETTLED and r,
                       "the background resolver to settle the row")
    assert settled.tx_hash == row.tx_hash  # the same transaction, not a second one
    assert chain.balance(PAY_TO) - before == PRICE
    assert_ledger_matches_chain(gateway.ledger, chain, before)
