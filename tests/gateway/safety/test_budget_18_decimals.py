"""Budgets on an 18-decimal token (DAI, WETH): 0.01 token is 10**16 atomic units, past 2**53 (the
exact range of a Lua double) and a few tokens pass 2**63 (Redis INCRBY). A budget there is
counted exactly, on the memory store and on Redis, and a price above it is a 403, never a 500."""

from __future__ import annotations

import pytest

from catalog import Catalogs, parse_catalog
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.safety.checks import Safety
from gateway.store import StateStore
from settlement.ledger import PaymentState
from tests.gateway.conftest import StoreBackend

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
CENT = 10**16  # 0.01 of an 18-decimal token

CATALOG = """\
catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "Dai Stablecoin"
  asset_version: "1"
  decimals: 18
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  legacy:
    base_url: "http://127.0.0.1:9"
budgets:
  per_payer: {{amount: "{per_payer}", window: 1d}}
  per_owner: {{amount: "{per_owner}", window: 1h}}
tools:
  - name: quote
    description: Q
    method: GET
    path: /q
    price: "0.01"
"""


class SettledLedger:
    def get(self, payment_id: int) -> object:
        return type("Row", (), {"state": PaymentState.SETTLED})()


def settled_ctx() -> RequestContext:
    request = RequestContext(method="GET", path="/q", query="", client="10.0.0.1")
    request.outcome, request.payment_id = "settled", 1
    return request


def safety_for(store: StateStore, per_payer: str, per_owner: str) -> tuple[Safety, Catalogs]:
    catalogs = Catalogs(catalogs=(parse_catalog(CATALOG.format(per_payer=per_payer, per_owner=per_owner)),))
    return Safety(store, catalogs), catalogs


def test_a_realistic_18_decimal_budget_is_accepted_and_counted_exactly(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        safety, catalogs = safety_for(store, "20.05", "1000")  # 2.005 * 10**19 and 10**21: past 2**63
        quote = catalogs.tool("quote")
        for _ in range(5):  # 4.01 tokens a call (a dear call, or an amount the caller was asked)
            request = settled_ctx()
            await safety.reserve(request, quote, PAYER, 401 * CENT)
            await safety.finish(request, SettledLedger())  # kept: the money moved
        with pytest.raises(GatewayError) as over:
            await safety.reserve(settled_ctx(), quote, PAYER, CENT)
        assert (over.value.status, over.value.code) == (403, "budget_exceeded")
        assert over.value.fields["usedAtomic"] == str(2005 * CENT)
        assert over.value.fields["limitAtomic"] == str(2005 * CENT)

    store_backend.run(body)


def test_an_18_decimal_price_above_the_budget_is_a_403_not_a_500(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        # 9 * 10**15 < 2**53 < the 10**16 price: a catalog every version accepted at start
        safety, catalogs = safety_for(store, "0.009", "0.009")
        with pytest.raises(GatewayError) as over:
            await safety.reserve(settled_ctx(), catalogs.tool("quote"), PAYER, CENT)
        assert (over.value.status, over.value.code) == (403, "budget_exceeded")

    store_backend.run(body)
