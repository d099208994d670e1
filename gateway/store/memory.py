"""The in-memory backend: one process. Every operation runs without an ``await`` between its check
and its write, so it is atomic within the event loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.store.base import (
    BUDGET_GRACE_SECONDS,
    BudgetDecision,
    TokenDecision,
    bucket_idle_ms,
    check_bucket,
    check_ttl,
    check_units,
    check_window,
    window_start,
)

__all__ = ["MemoryStore"]


@dataclass
class _Bucket:
    tokens: float
    updated: float  # monotonic seconds
    expires_at: float


class MemoryStore:
    """One process. ``clock`` (monotonic) drives expiry and buckets; ``wall_clock`` (unix seconds)
    drives budget windows, which are aligned to the epoch. Both are injectable for tests."""

    _SWEEP_EVERY = 1024  # writes between purges of expired entries, so idle keys do not pile up

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        # one keyspace for values and locks, as in Redis: a lock's value is its owner
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._budgets: dict[str, tuple[int, int]] = {}  # "key:window_start" → (used, expires_at unix)
        self._writes = 0

    # -- values and locks

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and self._clock() >= expires_at:
            del self._values[key]
            return None
        return value

    def _set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        expires_at = None if ttl_ms is None else self._clock() + ttl_ms / 1000
        self._values[key] = (value, expires_at)
        self._wrote()

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        check_ttl(ttl_ms)
        if self._live(key) is not None:
            return False
        self._set(key, owner.encode(), ttl_ms)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._live(key) != owner.encode():
            return False
        del self._values[key]
        return True

    async def extend(self, key: str, owner: str, ttl_ms: int) -> bool:
        check_ttl(ttl_ms)
        if self._live(key) != owner.encode():
            return False
        self._set(key, owner.encode(), ttl_ms)
        return True

    async def holder(self, key: str) -> str | None:
        value = self._live(key)
        return None if value is None else value.decode()

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._live(key) for key in keys]

    async def put(
        self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False
    ) -> bool:
        if ttl_ms is not None:
            check_ttl(ttl_ms)
        if only_if_absent and self._live(key) is not None:
            return False
        self._set(key, value, ttl_ms)
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    # -- rate limits

    async def take_token(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> TokenDecision:
        check_bucket(rate_per_second, burst, cost)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None or now >= bucket.expires_at:
            tokens = float(burst)
        else:
            tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.updated) * rate_per_second)
        if tokens < cost:
            # nothing written: the stored state refills to the same value next time
            return TokenDecision(False, math.floor(tokens), (cost - tokens) / rate_per_second)
        tokens -= cost
        expires_at = now + bucket_idle_ms(rate_per_second, burst) / 1000
        self._buckets[key] = _Bucket(tokens, now, expires_at)
        self._wrote()
        return TokenDecision(True, math.floor(tokens), 0.0)

    # -- budgets

    async def reserve_budget(self, key: str, amount: int, limit: int, window_seconds: int) -> BudgetDecision:
        check_units("amount", amount)
        check_units("limit", limit)
        check_window(window_seconds)
        start = window_start(math.floor(self._wall_clock()), window_seconds)
        resets_at = start + window_seconds
        window_key = f"{key}:{start}"
        used = self._budget_used(window_key)
        if amount > limit - used:
            return BudgetDecision(False, used, limit, resets_at)
        used += amount
        self._budgets[window_key] = (used, resets_at + BUDGET_GRACE_SECONDS)
        self._wrote()
        return BudgetDecision(True, used, limit, resets_at)

    async def release_budget(self, key: str, amount: int, window_seconds: int, resets_at: float) -> None:
        check_units("amount", amount)
        check_window(window_seconds)
        window_key = f"{key}:{int(resets_at) - window_seconds}"
        used = self._budget_used(window_key)
        entry = self._budgets.get(window_key)
        if entry is not None:
            self._budgets[window_key] = (max(0, used - amount), entry[1])

    def _budget_used(self, window_key: str) -> int:
        entry = self._budgets.get(window_key)
        if entry is None:
            return 0
        if self._wall_clock() >= entry[1]:
            del self._budgets[window_key]
            return 0
        return entry[0]

    # -- housekeeping

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes % self._SWEEP_EVERY == 0:
            now, wall = self._clock(), self._wall_clock()
            for key in [k for k, (_, exp) in self._values.items() if exp is not None and now >= exp]:
                del self._values[key]
            for key in [k for k, b in self._buckets.items() if now >= b.expires_at]:
                del self._buckets[key]
            for key in [k for k, (_, exp) in self._budgets.items() if wall >= exp]:
                del self._budgets[key]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

