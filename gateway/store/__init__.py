"""Shared state: in-flight locks, idempotency records, rate-limit buckets and budget counters.

One interface (``base.StateStore``), two backends. ``MemoryStore`` serves one process;
``RedisStore`` serves many replicas. ``create_store`` picks one from the settings.

    base.py     the protocol, its decisions, ``StoreUnavailable`` and the shared argument checks
    memory.py   one process, atomic within the event loop
    redis.py    many replicas, one command or Lua script per decision
"""

from __future__ import annotations

import contextlib
import math
import os

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


class Turns:
    """Whether this process runs a periodic job's round now (``await turns()``): of the processes
    sharing ``store``, the one holding the job's lock (taken for one and a half rounds, kept by its
    holder each round), so one process does the work, and another takes over within a round and a
    half of its holder's death. With the store away, every process runs its rounds (as each did
    before turns). ``give_up``: a holder that cannot do the work (its chain away) lets the lock go
    and sits out the next two rounds, so a process that can takes it, not the same one again."""

    def __init__(self, store: StateStore, job: str, every_seconds: float) -> None:
        self.store, self.key = store, f"turn:{job}"
        self.owner = f"{os.getpid()}-{os.urandom(6).hex()}"
        self.ttl_ms = max(1, math.ceil(every_seconds * 1500))
        self._sitting_out = 0

    async def __call__(self) -> bool:
        if self._sitting_out:
            self._sitting_out -= 1
            return False
        try:
            if await self.store.acquire(self.key, self.owner, self.ttl_ms):
                return True
            return await self.store.holder(self.key) == self.owner and await self.store.extend(self.key, self.owner, self.ttl_ms)
        except StoreUnavailable:
            return True

    async def give_up(self) -> None:
        self._sitting_out = 2
        with contextlib.suppress(StoreUnavailable):
            await self.store.release(self.key, self.owner)


def taking_turns(store: StateStore, job: str, every_seconds: float) -> Turns:
    return Turns(store, job, every_seconds)


def create_store(redis_url: str | None, prefix: str = "x402gw:") -> StateStore:
    if redis_url is None:
        return MemoryStore()
    # A worker of ``serve --workers N`` tags its locks with its supervisor's group and its pid: when it
    # dies, the supervisor releases them at once (a resend of its payment is resolved then, not after the
    # lock's TTL). The group, random per supervisor, keeps another host's (another pid namespace's) alone.
    tag = f"@{os.environ.get(WORKER_GROUP_ENV, '')}.{os.getpid()}" if os.environ.get(WORKER_ENV) else ""
    return RedisStore(redis_url, prefix=prefix, owner_tag=tag)

