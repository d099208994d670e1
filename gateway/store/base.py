"""The store's contract: the ``StateStore`` protocol, its decisions, its one error and the argument
checks both backends share, so a memory store and a Redis fleet refuse the same things.

Errors::

    StoreUnavailable        the backend cannot be reached or did not answer in time (HTTP 503)
    ValueError              a caller passed an impossible argument (a bug, not an outage)

Amounts are ``int`` atomic units, exact on both backends up to ``MAX_EXACT_UNITS`` (2**256 - 1,
the largest amount a token can move); see ``gateway.store.redis`` for how Redis keeps them exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BUDGET_GRACE_SECONDS",
    "MAX_EXACT_UNITS",
    "BudgetDecision",
    "StateStore",
    "StoreUnavailable",
    "TokenDecision",
    "bucket_idle_ms",
    "check_bucket",
    "check_ttl",
    "check_units",
    "check_window",
    "window_start",
]

MAX_EXACT_UNITS = 2**256 - 1  # uint256: every amount a token can express
BUDGET_GRACE_SECONDS = 60  # a window's counter outlives the window by this much, for late releases


class StoreUnavailable(Exception):
    """The state store cannot be reached. The message is fixed: backend detail goes to the log
    through ``__cause__``, never to the client."""

    code = "store_unavailable"

    def __init__(self, message: str = "the state store is unavailable") -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class TokenDecision:
    allowed: bool
    remaining: int
    retry_after_seconds: float


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    used: int
    limit: int
    resets_at: int  # unix seconds at which the current window ends


class StateStore(Protocol):
    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Take the lock ``key`` for ``owner`` if nobody holds it; it lapses after ``ttl_ms``.
        Not re-entrant: a second acquire by the same owner is refused."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Drop the lock only if ``owner`` still holds it (it may have lapsed and been re-taken)."""
        ...

    async def extend(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Push the lock's lapse to ``ttl_ms`` from now, only if ``owner`` still holds it."""
        ...

    async def holder(self, key: str) -> str | None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys``, in order (None where absent), read together: one round trip on Redis."""
        ...

    async def put(
        self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False
    ) -> bool:
        """Store ``value``; with ``only_if_absent`` refuse (return False) when the key exists."""
        ...

    async def delete(self, key: str) -> None: ...

    async def take_token(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> TokenDecision:
        """Token bucket holding at most ``burst`` tokens, refilled at ``rate_per_second``."""
        ...

    async def reserve_budget(self, key: str, amount: int, limit: int, window_seconds: int) -> BudgetDecision:
        """Add ``amount`` to the current epoch-aligned window unless that would pass ``limit``;
        a refusal changes nothing."""
        ...

    async def release_budget(self, key: str, amount: int, window_seconds: int, resets_at: float) -> None:
        """Give back a reservation made in the window ending at ``resets_at``; never below zero.
        A window that has already been forgotten is left alone."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Argument checks, shared so both backends refuse the same things.


def check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError("ttl_ms must be positive")


def check_units(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int of atomic units")
    if value < 0 or value > MAX_EXACT_UNITS:
        raise ValueError(f"{name} must be between 0 and 2**256 - 1")


def check_window(window_seconds: int) -> None:
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, int) or window_seconds <= 0:
        raise ValueError("window_seconds must be a positive int")


def check_bucket(rate_per_second: float, burst: int, cost: int) -> None:
    if not rate_per_second > 0 or math.isinf(rate_per_second):
        raise ValueError("rate_per_second must be positive and finite")
    if burst < 1:
        raise ValueError("burst must be at least 1")
    if not 1 <= cost <= burst:
        # a cost above the burst could never be paid: refuse the configuration, not the caller
        raise ValueError("cost must be between 1 and burst")


def bucket_idle_ms(rate_per_second: float, burst: int) -> int:
    """After this long untouched a bucket is full again, so forgetting it changes nothing."""
    return math.ceil(burst / rate_per_second * 1000) + 1000


def window_start(now: int, window_seconds: int) -> int:
    return now - now % window_seconds
