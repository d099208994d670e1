"""Shared state: in-flight locks, idempotency records, rate-limit buckets and budget counters.

One interface (``base.StateStore``), two backends. ``MemoryStore`` serves one process;
``RedisStore`` serves many replicas. ``create_store`` picks one from the settings.

    base.py     the protocol, its decisions, ``StoreUnavailable`` and the shared argument checks
    memory.py   one process, atomic within the event loop
    redis.py    many replicas, one command or Lua script per decision
"""

from __future__ import annotations

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
    "TokenDecision",
    "create_store",
]


WORKER_ENV = "X402GW_WORKER_INDEX"  # set by ``serve --workers N`` for each worker process


def create_store(redis_url: str | None, prefix: str = "x402gw:") -> StateStore:
    if redis_url is None:
        return MemoryStore()
    # A worker of ``serve --workers N`` tags its locks with its pid: when it dies, the supervisor
    # releases them at once (a resend of its payment is resolved then, not after the lock's TTL).
    tag = f"@{os.getpid()}" if os.environ.get(WORKER_ENV) else ""
    return RedisStore(redis_url, prefix=prefix, owner_tag=tag)

