"""Attacks on ``x402gw serve --workers 2`` (Redis + PostgreSQL): what one process's guards would miss.

One balance signed over many times at once, the requests spread over both workers: each worker
counted only its own settlements in flight (``settlement.schemes.exact_guards.InFlight``), so each
broadcast one, and every settlement but the first reverted on the gateway's gas. The holds are in
Redis now: at most balance / price settlements are broadcast across the workers, nothing reverts.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from eth_account import Account

from settlement.ledger import Ledger, PaymentState
from tests.conftest import PAY_TO, Devchain
from tests.e2e.test_attacks_gas import FUNDER, at_once_then_mined, pay_header
from tests.e2e.test_exactly_once import PRICE
from tests.e2e.test_exactly_once import chain as chain
from tests.e2e.test_workers import database as database
from tests.e2e.test_workers import workers as workers
from tests.support import chain_actions
from tests.support.processes import GatewayProcess

pytestmark = pytest.mark.e2e


def test_one_balance_signed_many_times_over_two_workers_does_not_buy_reverted_settlements(
    workers: tuple[GatewayProcess, Ledger, dict[str, str]], chain: Devchain, request: pytest.FixtureRequest,
) -> None:
    supervisor, ledger, settlers = workers
    attacker = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), PRICE)  # one price, no more
    address = Account.from_key(attacker).address.lower()
    paths = [f"/quotes/AW{chr(65 + n)}" for n in range(8)]
    with httpx.Client(base_url=supervisor.url, timeout=30) as client:
        headers = [pay_header(client, attacker, path) for path in paths]
    sent_before = {a: chain.w3.eth.get_transaction_count(chain.w3.to_checksum_address(a)) for a in settlers}
    pay_to_before = chain.balance(PAY_TO)
    mine: Callable[[], None] = request.getfixturevalue("manual_mining")  # every settlement stays in flight
    # a connection each: the kernel spreads them over the workers
    answers = at_once_then_mined(chain, ledger, supervisor.url, paths, headers, mine)

    assert [a.status_code for a in answers].count(200) == 1, [(a.status_code, a.text[:120]) for a in answers]
    assert {a.status_code for a in answers} <= {200, 402}, [(a.status_code, a.text[:120]) for a in answers]
    assert chain.balance(address) == 0 and chain.balance(PAY_TO) - pay_to_before == PRICE
    rows = [r for r in ledger.all() if r.payer.lower() == address]
    assert [r.state for r in rows].count(PaymentState.SETTLED) == 1
    reverted = [r for r in rows if r.tx_hash and chain.w3.eth.get_transaction_receipt(r.tx_hash)["status"] == 0]  # type: ignore[arg-type]
    sent = sum(chain.w3.eth.get_transaction_count(chain.w3.to_checksum_address(a)) - n for a, n in sent_before.items())
    assert (sent, len(reverted)) == (1, 0), (
        f"{sent} settlements broadcast by the two workers for one balance of one price, {len(reverted)} reverted "
        f"({[(r.state, r.error_reason) for r in rows]})")
