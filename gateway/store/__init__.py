"""Shared state: in-flight locks, idempotency records, rate-limit buckets and budget counters.

One interface (``base.StateStore``), two backends. ``MemoryStore`` serves one process;
``RedisStore`` serves many replicas. ``create_store`` picks one from the settings.

    base.py     the protocol, its decisions, ``StoreUnavailable`` and the shared argument checks
    memory.py   one process, atomic within the event loop
    redis.py    many replicas, one command or Lua script per decision
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable

from gateway.store.base import (
    MAX_EXACT_UNITS,
    BudgetDecision,
    StateStore,
    StoreUnavailable,
    TokenDecision,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

__all__ = [
    "MAX_EXACT_UNITS",
    "BudgetDecision",
    "MemoryStore",
    "RedisStore",
    "StateStore",
    "StoreUnavailable",
    "WORKER_GROUP_ENV",
    "payment_lock",
    "TokenDecision",
    "create_store",
    "taking_turns",
]


WORKER_ENV = "X402GW_WORKER_INDEX"  # set by ``serve --workers N`` for each worker process
def payment_lock(network: str, payer: str, nonce: str) -> str:
    """The key of the lock a payment's request holds while it runs (``exactly_once``), which the served
    facilitator's settle and the lost-answer sweep look at too: one spelling for all of them."""
    return f"pay:{network}:{payer.lower()}:{nonce.lower()}"


WORKER_GROUP_ENV = "X402GW_WORKER_GROUP"  # the supervisor's random id, in each of its workers' lock tags


def taking_turns(store: StateStore, job: str, every_seconds: float) -> Callable[[], Awaitable[bool]]:
    """Whether this process runs a periodic job's round now: of the processes sharing ``store``, the
    one holding the job's lock (taken for one and a half rounds, kept by its holder each round), so
    one process does the work, and another takes over within a round and a half of its holder's
    death. With the store away, every process runs its rounds (as each did before turns)."""
    owner, key = f"{os.getpid()}-{os.urandom(6).hex()}", f"turn:{job}"
    ttl_ms = max(1, math.ceil(every_seconds * 1500))

    async def my_turn() -> bool:
        try:
            if await store.acquire(key, owner, ttl_ms):
                return True
            return await store.holder(key) == owner and await store.extend(key, owner, ttl_ms)
        except StoreUnavailable:
            return True

    return my_turn


def create_store(redis_url: str | None, prefix: str = "x402gw:") -> StateStore:
    if redis_url is None:
        return MemoryStore()
    # A worker of ``serve --workers N`` tags its locks with its supervisor's group and its pid: when it
    # dies, the supervisor releases them at once (a resend of its payment is resolved then, not after the
    # lock's TTL). The group, random per supervisor, keeps another host's (another pid namespace's) alone.
    tag = f"@{os.environ.get(WORKER_GROUP_ENV, '')}.{os.getpid()}" if os.environ.get(WORKER_ENV) else ""
    return RedisStore(redis_url, prefix=prefix, owner_tag=tag)

