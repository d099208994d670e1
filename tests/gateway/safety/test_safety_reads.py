"""Before any 402 the kill switches and the tool's circuit breaker are read together: one store read
(one Redis round trip) per request instead of two, on both backends, and still with no caching, so
a switch or a breaker set by another replica refuses the very next request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from gateway.errors import GatewayError
from gateway.safety.breaker import Breakers
from gateway.safety.checks import Safety
from gateway.safety.policy import Policy
from gateway.store import StateStore
from tests.gateway.conftest import StoreBackend
from tests.gateway.safety.test_breaker import CATALOG as BREAKER_CATALOG
from tests.gateway.safety.test_breaker import fail
from tests.gateway.safety.test_safety import catalogs, ctx


class CountingStore:
    """The real store, with its reads counted (everything else passes straight through)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.reads: list[tuple[str, tuple[str, ...]]] = []

    async def get(self, key: str) -> bytes | None:
        self.reads.append(("get", (key,)))
        return await self.store.get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.reads.append(("get_many", tuple(keys)))
        return await self.store.get_many(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_get_many_reads_values_in_order_with_none_for_absent_keys(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        await store.put("k:1", b"one")
        await store.put("k:3", b"three", ttl_ms=60_000)
        assert await store.get_many(["k:3", "k:2", "k:1", "k:3"]) == [b"three", None, b"one", b"three"]
        assert await store.get_many([]) == []

    store_backend.run(body)


def test_the_kill_switches_and_the_breaker_are_one_read(store_backend: StoreBackend) -> None:
    async def body(real: StateStore) -> None:
        store = CountingStore(real)
        shared = cast(StateStore, store)
        cats = catalogs(BREAKER_CATALOG)
        safety = Safety(shared, cats)
        tool = next(t for t in cats.tools if t.name == "a")
        await safety.before_challenge(ctx(), tool, 1000)
        assert store.reads == [("get_many", ("policy:overrides", "breaker:acme/flaky:open"))]

        # Another replica (its own objects, the same store) switches the tool off: refused at once.
        await Policy(real).set("tools", "a", True, "maintenance")
        with pytest.raises(GatewayError) as off:
            await safety.before_challenge(ctx(), tool, 1000)
        assert off.value.code == "tool_disabled"
        await Policy(real).set("tools", "a", False)

        # ... or opens the upstream's breaker: refused at once too.
        other = Breakers(real, cats.tools)
        await fail(other, tool, 3)
        with pytest.raises(GatewayError) as tripped:
            await safety.before_challenge(ctx(), tool, 1000)
        assert tripped.value.code == "upstream_circuit_open"
        assert [kind for kind, _ in store.reads] == ["get_many"] * 3

    store_backend.run(body)


def test_a_policy_on_another_store_is_still_read(store_backend: StoreBackend) -> None:
    """Kill switches kept apart from the breakers' store: each read from its own, none skipped."""

    async def body(real: StateStore) -> None:
        apart = CountingStore(real)
        cats = catalogs(BREAKER_CATALOG)
        safety = Safety(real, cats, policy=Policy(cast(StateStore, apart)))
        tool = next(t for t in cats.tools if t.name == "a")
        await Policy(real).set("tools", "a", True, "maintenance")
        with pytest.raises(GatewayError) as off:
            await safety.before_challenge(ctx(), tool, 1000)
        assert off.value.code == "tool_disabled"
        assert apart.reads == [("get", ("policy:overrides",))]

    store_backend.run(body)
