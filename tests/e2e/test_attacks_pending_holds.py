"""A settlement whose outcome is not known keeps its hold on the payer's balance, on a real anvil
with automining off and a gateway on loopback.

A payer's balance of one price, signed twice. The first settlement is broadcast and not mined
within the receipt timeout: 503 ``settlement_pending``, its transaction still in the node's pool.
Its hold on the balance used to be dropped there, so the second payment, read against a balance
that does not show the first spent yet, was broadcast too, and reverted on the gateway's gas once
both were mined. The hold now outlives the pending answer: the second is refused before anything
is broadcast, and the first lands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from eth_account import Account

from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, body_json, demo_catalog, upstream_hits
from tests.e2e.test_attacks_gas import FUNDER, pay_header, settler
from tests.e2e.test_attacks_gas import chain as chain
from tests.e2e.test_exactly_once import PRICE, wait_for
from tests.support import chain_actions

pytestmark = pytest.mark.e2e


def test_a_pending_settlement_keeps_its_hold_so_the_same_balance_is_not_broadcast_twice(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    gateway = start_gateway(demo_catalog(tmp_path, upstream), deployment_file=chain.deployment_file,
                            receipt_timeout_seconds=0.5, resolve_pending_seconds=3600)
    payer = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), PRICE)  # one price, no more
    address = Account.from_key(payer).address
    def sent() -> int:  # the settlement account's transactions, mined or in the node's pool
        return chain.w3.eth.get_transaction_count(chain.w3.to_checksum_address(settler(chain)), "pending")

    sent_before, pay_to_before = sent(), chain.balance(PAY_TO)
    mine: Callable[[], None] = request.getfixturevalue("manual_mining")  # automining off from here
    with gateway.client() as client:
        first_header, second_header = pay_header(client, payer, "/quotes/PHA"), pay_header(client, payer, "/quotes/PHB")
        first = client.get("/quotes/PHA", headers={"PAYMENT-SIGNATURE": first_header})
        assert first.status_code == 503 and body_json(first)["error"] == "settlement_pending", first.text
        second = client.get("/quotes/PHB", headers={"PAYMENT-SIGNATURE": second_header})

    assert second.status_code == 402, second.text  # refused at verify: the first may still land
    assert body_json(second)["error"] == "invalid_exact_evm_insufficient_balance"
    assert sent() - sent_before == 1  # one settlement broadcast, not two
    mine()  # the first lands
    rows = {r.path: r for r in gateway.ledger.all() if r.payer.lower() == address.lower()}
    receipt = wait_for(lambda: chain.w3.eth.get_transaction_receipt(rows["/quotes/PHA"].tx_hash),  # type: ignore[arg-type]
                       "the first settlement mined")
    assert receipt["status"] == 1
    assert chain.balance(address) == 0 and chain.balance(PAY_TO) - pay_to_before == PRICE
    assert list(rows) == ["/quotes/PHA"] and rows["/quotes/PHA"].state == PaymentState.PENDING  # until resolved
    assert upstream_hits(upstream, "GET /api/v1/quote/PHB") == 0
