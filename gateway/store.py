"""Shared state: in-flight locks, idempotency records, rate-limit buckets and budget counters.

One interface, two backends. ``MemoryStore`` serves one process (every operation runs without an
``await`` between its check and its write, so it is atomic within the event loop). ``RedisStore``
serves many replicas: every check that must hold across replicas is one Redis command — ``SET NX``
or a Lua script — never a read followed by a write.

Errors::

    StoreUnavailable        the backend cannot be reached or did not answer in time (HTTP 503)
    ValueError              a caller passed an impossible argument (a bug, not an outage)

Amounts are ``int`` atomic units, exact on both backends up to ``MAX_EXACT_UNITS`` (2**256 - 1,
the largest amount a token can move). Redis Lua numbers are IEEE doubles (exact only below 2**53,
which an 18-decimal token passes at 0.009 tokens) and ``INCRBY`` stops at 2**63 - 1 (9.2 tokens),
so the budget scripts keep counters, amounts and limits as decimal strings and add, subtract and
compare them digit by digit. Both backends refuse anything larger than ``MAX_EXACT_UNITS``, so a
process with a memory store and a fleet on Redis agree on every decision.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

    async def holder(self, key: str) -> str | None: ...

    async def get(self, key: str) -> bytes | None: ...

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


def create_store(redis_url: str | None, prefix: str = "x402gw:") -> StateStore:
    if redis_url is None:
        return MemoryStore()
    return RedisStore(redis_url, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# Argument checks, shared so both backends refuse the same things.


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError("ttl_ms must be positive")


def _check_units(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int of atomic units")
    if value < 0 or value > MAX_EXACT_UNITS:
        raise ValueError(f"{name} must be between 0 and 2**256 - 1")


def _check_window(window_seconds: int) -> None:
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, int) or window_seconds <= 0:
        raise ValueError("window_seconds must be a positive int")


def _check_bucket(rate_per_second: float, burst: int, cost: int) -> None:
    if not rate_per_second > 0 or math.isinf(rate_per_second):
        raise ValueError("rate_per_second must be positive and finite")
    if burst < 1:
        raise ValueError("burst must be at least 1")
    if not 1 <= cost <= burst:
        # a cost above the burst could never be paid: refuse the configuration, not the caller
        raise ValueError("cost must be between 1 and burst")


def _bucket_idle_ms(rate_per_second: float, burst: int) -> int:
    """After this long untouched a bucket is full again, so forgetting it changes nothing."""
    return math.ceil(burst / rate_per_second * 1000) + 1000


def _window_start(now: int, window_seconds: int) -> int:
    return now - now % window_seconds


# ---------------------------------------------------------------------------------------------
# In-memory backend.


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
        _check_ttl(ttl_ms)
        if self._live(key) is not None:
            return False
        self._set(key, owner.encode(), ttl_ms)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._live(key) != owner.encode():
            return False
        del self._values[key]
        return True

    async def holder(self, key: str) -> str | None:
        value = self._live(key)
        return None if value is None else value.decode()

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def put(
        self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False
    ) -> bool:
        if ttl_ms is not None:
            _check_ttl(ttl_ms)
        if only_if_absent and self._live(key) is not None:
            return False
        self._set(key, value, ttl_ms)
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    # -- rate limits

    async def take_token(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> TokenDecision:
        _check_bucket(rate_per_second, burst, cost)
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
        expires_at = now + _bucket_idle_ms(rate_per_second, burst) / 1000
        self._buckets[key] = _Bucket(tokens, now, expires_at)
        self._wrote()
        return TokenDecision(True, math.floor(tokens), 0.0)

    # -- budgets

    async def reserve_budget(self, key: str, amount: int, limit: int, window_seconds: int) -> BudgetDecision:
        _check_units("amount", amount)
        _check_units("limit", limit)
        _check_window(window_seconds)
        start = _window_start(math.floor(self._wall_clock()), window_seconds)
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
        _check_units("amount", amount)
        _check_window(window_seconds)
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


# ---------------------------------------------------------------------------------------------
# Redis backend. Times inside scripts come from the server's TIME, so replicas with skewed clocks
# share one view of buckets and windows. Redis >= 5 replicates script effects, which makes TIME
# before a write allowed.

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] bucket hash {tokens, ts}; ARGV rate, burst, cost, idle_ms.
# Returns {allowed, tokens, retry_after}; floats as strings, since Lua numbers reply as integers.
_TAKE_TOKEN_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
end
if tokens < cost then
  return {0, string.format('%.17g', tokens), string.format('%.17g', (cost - tokens) / rate)}
end
tokens = tokens - cost
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, string.format('%.17g', tokens), '0'}
"""

# Budget arithmetic on non-negative integers written as decimal strings without leading zeros:
# exact at any size (no Lua number ever holds an amount). Prepended to both budget scripts.
_DECIMAL_LUA = """
local function dec_cmp(a, b)
  if #a ~= #b then
    if #a < #b then return -1 end
    return 1
  end
  if a == b then return 0 end
  if a < b then return -1 end
  return 1
end
local function dec_add(a, b)
  local out, carry = {}, 0
  local i, j = #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(a, i) - 48; i = i - 1 end
    if j > 0 then d = d + string.byte(b, j) - 48; j = j - 1 end
    if d >= 10 then d = d - 10; carry = 1 else carry = 0 end
    out[#out + 1] = string.char(48 + d)
  end
  return string.reverse(table.concat(out))
end
local function dec_sub(a, b)
  local out, borrow = {}, 0
  local i, j = #a, #b
  while i > 0 do
    local d = string.byte(a, i) - 48 - borrow
    if j > 0 then d = d - (string.byte(b, j) - 48); j = j - 1 end
    if d < 0 then d = d + 10; borrow = 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + d)
    i = i - 1
  end
  local s = string.gsub(string.reverse(table.concat(out)), '^0+', '')
  if s == '' then return '0' end
  return s
end
"""

# KEYS[1] budget base key; ARGV amount, limit (decimal strings), window_seconds, grace_seconds.
# The window key is derived here from the server clock (single Redis, not Cluster: the derived key
# is not in KEYS). Returns {allowed, used as a decimal string, window end}.
_RESERVE_BUDGET_LUA = _DECIMAL_LUA + """
local window = tonumber(ARGV[3])
local now = tonumber(redis.call('TIME')[1])
local start = now - now % window
local key = KEYS[1] .. ':' .. string.format('%d', start)
local used = redis.call('GET', key) or '0'
local after = dec_add(used, ARGV[1])
if dec_cmp(after, ARGV[2]) > 0 then
  return {0, used, start + window}
end
redis.call('SET', key, after)
redis.call('EXPIREAT', key, start + window + tonumber(ARGV[4]))
return {1, after, start + window}
"""

# KEYS[1] window key; ARGV amount (a decimal string). A lapsed window is not recreated.
_RELEASE_BUDGET_LUA = _DECIMAL_LUA + """
local used = redis.call('GET', KEYS[1])
if not used then
  return 0
end
if dec_cmp(ARGV[1], used) >= 0 then
  redis.call('SET', KEYS[1], '0', 'KEEPTTL')
else
  redis.call('SET', KEYS[1], dec_sub(used, ARGV[1]), 'KEEPTTL')
end
return 1
"""


@contextlib.contextmanager
def _unavailable_on_redis_errors() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as exc:
        raise StoreUnavailable() from exc


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str = "x402gw:",
        *,
        connect_timeout: float = 2.0,
        op_timeout: float = 2.0,
    ) -> None:
        self._prefix = prefix
        # No retries: a command that timed out may have run, and re-sending a SET NX, a token take
        # or a budget increment would refuse our own lock or count twice. Fail fast; answer 503.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=op_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._take_token = self._redis.register_script(_TAKE_TOKEN_LUA)
        self._reserve_budget = self._redis.register_script(_RESERVE_BUDGET_LUA)
        self._release_budget = self._redis.register_script(_RELEASE_BUDGET_LUA)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        with _unavailable_on_redis_errors():
            return bool(await self._redis.set(self._key(key), owner, px=ttl_ms, nx=True))

    async def release(self, key: str, owner: str) -> bool:
        with _unavailable_on_redis_errors():
            return bool(await self._release(keys=[self._key(key)], args=[owner]))

    async def holder(self, key: str) -> str | None:
        value = await self.get(key)
        return None if value is None else value.decode()

    async def get(self, key: str) -> bytes | None:
        with _unavailable_on_redis_errors():
            value = await self._redis.get(self._key(key))
        # the client is built without decode_responses, so replies are bytes
        return cast("bytes | None", value)

    async def put(
        self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False
    ) -> bool:
        if ttl_ms is not None:
            _check_ttl(ttl_ms)
        with _unavailable_on_redis_errors():
            return bool(await self._redis.set(self._key(key), value, px=ttl_ms, nx=only_if_absent))

    async def delete(self, key: str) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.delete(self._key(key))

    async def take_token(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> TokenDecision:
        _check_bucket(rate_per_second, burst, cost)
        args: list[str | int] = [repr(float(rate_per_second)), burst, cost, _bucket_idle_ms(rate_per_second, burst)]
        with _unavailable_on_redis_errors():
            allowed, tokens, retry_after = await self._take_token(keys=[self._key(key)], args=args)
        return TokenDecision(bool(allowed), math.floor(float(tokens)), float(retry_after))

    async def reserve_budget(self, key: str, amount: int, limit: int, window_seconds: int) -> BudgetDecision:
        _check_units("amount", amount)
        _check_units("limit", limit)
        _check_window(window_seconds)
        args = [str(amount), str(limit), window_seconds, BUDGET_GRACE_SECONDS]
        with _unavailable_on_redis_errors():
            allowed, used, resets_at = await self._reserve_budget(keys=[self._key(key)], args=args)
        return BudgetDecision(bool(allowed), int(used), limit, int(resets_at))

    async def release_budget(self, key: str, amount: int, window_seconds: int, resets_at: float) -> None:
        _check_units("amount", amount)
        _check_window(window_seconds)
        window_key = f"{self._key(key)}:{int(resets_at) - window_seconds}"
        with _unavailable_on_redis_errors():
            await self._release_budget(keys=[window_key], args=[str(amount)])

    async def ping(self) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
