"""A half-open breaker's one probe is taken only by a payment that passed verify: a griefer's junk
or unfunded payments, which reach the pre-challenge checks for free, never hold it, so they cannot
keep a recovering upstream closed to paying customers. On both store backends."""

from __future__ import annotations

import pytest

from catalog import Catalogs, parse_catalog
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.safety.breaker import Breakers
from gateway.safety.checks import Safety
from gateway.store import StateStore
from tests.gateway.conftest import FakeClock, StoreBackend
from tests.gateway.safety.test_breaker import CATALOG


def request() -> RequestContext:
    return RequestContext(method="GET", path="/a", query="", client="10.0.0.1")


def test_only_a_verified_payment_takes_the_probe(store_backend: StoreBackend) -> None:
    clock = FakeClock()
    catalogs = Catalogs(catalogs=(parse_catalog(CATALOG),))
    tool = catalogs.tool("a")

    async def body(store: StateStore) -> None:
        safety = Safety(store, catalogs, breakers=Breakers(store, catalogs.tools, clock=clock))
        for _ in range(3):
            await safety.breakers.record(await safety.breakers.check(tool), ok=False)
        clock.advance(10)  # half-open

        griefers = [request() for _ in range(5)]
        for junk in griefers:  # in flight at once, each stopped before or by verify
            await safety.before_challenge(junk, tool, 1000)
            assert junk.safety.ticket.probe_owner is None
        customer = request()
        await safety.before_challenge(customer, tool, 1000)  # not refused: nobody holds the probe
        await safety.per_tool(customer, tool)  # after verify
        assert customer.safety.ticket.probe_owner == customer.request_id

        second = request()
        await safety.before_challenge(second, tool, 1000)
        with pytest.raises(GatewayError) as busy:  # one probe at a time, still
            await safety.per_tool(second, tool)
        assert busy.value.code == "upstream_circuit_open" and busy.value.status == 503
        for junk in griefers:
            await safety.finish(junk, None)  # type: ignore[arg-type]  # nothing held: no ledger read
        await safety.upstream_result(customer, tool, ok=True)
        assert await safety.breakers.open_breakers() == []  # the customer's probe closed it
        await safety.finish(customer, None)  # type: ignore[arg-type]

    store_backend.run(body)
