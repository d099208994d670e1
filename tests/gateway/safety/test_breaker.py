"""Circuit breaker per upstream on both store backends, with a clock that moves only when told."""

from __future__ import annotations

import pytest

from catalog import Tool, parse_catalog
from gateway.errors import GatewayError
from gateway.safety.breaker import Breakers, Ticket
from gateway.store import StateStore
from tests.gateway.conftest import FakeClock, StoreBackend

CATALOG = """\
catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  flaky:
    base_url: "http://127.0.0.1:9"
    breaker: {failures: 3, window_seconds: 86400, cooldown_seconds: 10}
  steady:
    base_url: "http://127.0.0.1:10"
tools:
  - {name: a, description: A, method: GET, path: /a, upstream: flaky, price: "0.001"}
  - {name: b, description: B, method: GET, path: /b, upstream: flaky, price: "0.001"}
  - {name: c, description: C, method: GET, path: /c, upstream: steady, price: "0.001"}
"""


@pytest.fixture
def tools() -> dict[str, Tool]:
    return {t.name: t for t in parse_catalog(CATALOG).tools}


def breakers_on(store: StateStore, tools: dict[str, Tool], clock: FakeClock) -> Breakers:
    return Breakers(store, tools.values(), clock=clock)


async def fail(breakers: Breakers, tool: Tool, times: int) -> None:
    for _ in range(times):
        ticket = await breakers.check(tool)
        await breakers.record(ticket, ok=False)


def test_catalog_breaker_defaults_and_overrides(tools: dict[str, Tool]) -> None:
    assert (tools["a"].upstream.breaker.failures, tools["a"].upstream.breaker.cooldown_seconds) == (3, 10)
    assert tools["c"].upstream.breaker.model_dump() == {"failures": 5, "window_seconds": 30, "cooldown_seconds": 10}


def test_opens_after_n_failures_and_refuses_every_tool_of_that_upstream(
    store_backend: StoreBackend, tools: dict[str, Tool]
) -> None:
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        await fail(breakers, tools["a"], 2)
        await breakers.check(tools["a"])  # two failures of three: still closed
        await fail(breakers, tools["b"], 1)  # the third, through another tool of the same upstream
        for name in ("a", "b"):
            with pytest.raises(GatewayError) as refused:
                await breakers.check(tools[name])
            assert refused.value.status == 503 and refused.value.code == "upstream_circuit_open"
            assert refused.value.fields["retryAfter"] == 10
            assert refused.value.to_response().headers["retry-after"] == "10"
        await breakers.check(tools["c"])  # another upstream is not affected
        assert [b["upstream"] for b in await breakers.open_breakers()] == ["acme/flaky"]
        assert breakers.states()["acme/flaky"] == "open"

    store_backend.run(body)


def test_client_errors_do_not_count(store_backend: StoreBackend, tools: dict[str, Tool]) -> None:
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        for _ in range(10):
            await breakers.record(await breakers.check(tools["a"]), ok=True)  # e.g. 404s
        await breakers.check(tools["a"])
        assert await breakers.open_breakers() == []

    store_backend.run(body)


def test_half_open_lets_one_probe_through_and_success_closes(
    store_backend: StoreBackend, tools: dict[str, Tool]
) -> None:
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        await fail(breakers, tools["a"], 3)
        clock.advance(9)
        with pytest.raises(GatewayError) as still_open:
            await breakers.check(tools["a"])
        assert still_open.value.fields["retryAfter"] == 1
        clock.advance(1)
        assert (await breakers.open_breakers())[0]["state"] == "half_open"
        unpaid = await breakers.check(tools["a"])  # an unpaid request gets its 402
        assert unpaid.probe_owner is None
        probe = await breakers.check(tools["a"], "request-1")
        assert probe.probe_owner == "request-1"
        with pytest.raises(GatewayError):
            await breakers.check(tools["b"], "request-2")  # one probe at a time
        await breakers.record(probe, ok=True)
        assert await breakers.open_breakers() == []
        await breakers.check(tools["b"], "request-2")
        # the failures before opening were forgotten: it takes three again
        await fail(breakers, tools["a"], 2)
        await breakers.check(tools["a"])

    store_backend.run(body)


def test_failed_probe_reopens_for_a_full_cooldown(store_backend: StoreBackend, tools: dict[str, Tool]) -> None:
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        await fail(breakers, tools["a"], 3)
        clock.advance(10)
        probe = await breakers.check(tools["a"], "request-1")
        await breakers.record(probe, ok=False)
        with pytest.raises(GatewayError) as reopened:
            await breakers.check(tools["a"], "request-2")
        assert reopened.value.fields["retryAfter"] == 10

    store_backend.run(body)


def test_a_probe_that_never_reached_the_upstream_is_given_back(
    store_backend: StoreBackend, tools: dict[str, Tool]
) -> None:
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        await fail(breakers, tools["a"], 3)
        clock.advance(10)
        probe = await breakers.check(tools["a"], "request-1")
        await breakers.release(probe)  # e.g. its payment was refused
        again = await breakers.check(tools["a"], "request-2")
        assert again.probe_owner == "request-2"
        await breakers.release(Ticket("acme/flaky"))  # a ticket without a probe: nothing to give back

    store_backend.run(body)


def test_state_is_shared_between_two_breaker_instances_on_one_store(
    store_backend: StoreBackend, tools: dict[str, Tool]
) -> None:
    """Two replicas: what one learns, the other refuses on."""
    clock = FakeClock()

    async def body(store: StateStore) -> None:
        one, two = breakers_on(store, tools, clock), breakers_on(store, tools, clock)
        await fail(one, tools["a"], 3)
        with pytest.raises(GatewayError):
            await two.check(tools["a"])

    store_backend.run(body)


def test_an_upstream_answering_429_is_backed_off_for_its_retry_after_without_a_failure_counted(
    store_backend: StoreBackend, tools: dict[str, Tool]
) -> None:
    """A 429 to the owner's credentials: nobody is served now, so the upstream's tools are refused
    before any 402 for its Retry-After (capped), or the cool-down when it gives none; a later,
    shorter one does not shorten it; and it is not a failure (two more make no outage of three)."""
    clock = FakeClock()

    async def retry_after(breakers: Breakers, tool: Tool) -> int:
        with pytest.raises(GatewayError) as refused:
            await breakers.check(tool)
        assert refused.value.status == 503 and refused.value.code == "upstream_circuit_open"
        return int(refused.value.fields["retryAfter"])

    async def body(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        await breakers.back_off(tools["a"], 120.0)
        assert await retry_after(breakers, tools["b"]) in (119, 120)  # every tool of that upstream
        await breakers.check(tools["c"])  # not another upstream's
        await breakers.back_off(tools["a"], 5.0)
        assert await retry_after(breakers, tools["a"]) in (119, 120)  # not shortened
        await breakers.back_off(tools["c"], None)
        assert await retry_after(breakers, tools["c"]) == 10  # the cool-down
        clock.advance(11)
        await breakers.back_off(tools["c"], 1.0)
        assert await retry_after(breakers, tools["c"]) == 10  # never shorter than the cool-down
        await breakers.back_off(tools["c"], 10.0**9)
        assert await retry_after(breakers, tools["c"]) in (3599, 3600)  # capped

    store_backend.run(body)

    async def no_failure_counted(store: StateStore) -> None:
        breakers = breakers_on(store, tools, clock)
        clock.advance(3700)  # the openings above are over
        await breakers.record(await breakers.check(tools["a"], probe_owner="req-0"), ok=True)
        await breakers.back_off(tools["a"], 1.0)
        clock.advance(11)  # the cool-down over: half-open, a probe closes it
        ticket = await breakers.check(tools["a"], probe_owner="req-1")
        await breakers.record(ticket, ok=True)
        await fail(breakers, tools["a"], 2)
        await breakers.check(tools["a"])  # two failures of three: closed

    if store_backend.clock is not None:
        store_backend.run(no_failure_counted)
