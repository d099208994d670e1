"""Gateway fixtures: the state store on both backends (memory with a fake clock, real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
import redis

from gateway.store import MemoryStore, RedisStore, StateStore

REDIS_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


class FakeClock:
    """Serves as both the monotonic and the wall clock of a MemoryStore; moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StoreBackend:
    name: str
    make: Callable[[], StateStore]
    clock: FakeClock | None = None  # memory only: Redis keeps the server's time
    prefix: str = ""  # redis only

    def run(self, body: Callable[[StateStore], Awaitable[T]]) -> T:
        """Run ``body`` against a fresh store handle in a fresh event loop, then close the handle."""

        async def main() -> T:
            store = self.make()
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(main())


def redis_test_prefix() -> str:
    return f"x402gw-test-{uuid.uuid4().hex}:"


def delete_prefixed(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def store_backend(request: pytest.FixtureRequest) -> Iterator[StoreBackend]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock, wall_clock=clock)  # one instance: state outlives run()
        yield StoreBackend("memory", lambda: store, clock=clock)
        return
    prefix = redis_test_prefix()
    try:
        yield StoreBackend("redis", lambda: RedisStore(REDIS_URL, prefix=prefix), prefix=prefix)
    finally:
        delete_prefixed(prefix)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = redis_test_prefix()
    try:
        yield prefix
    finally:
        delete_prefixed(prefix)
