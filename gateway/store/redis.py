"""The Redis backend: many replicas. Every check that must hold across replicas is one Redis
command (``SET NX`` or a Lua script), never a read followed by a write.

Redis Lua numbers are IEEE doubles (exact only below 2**53, which an 18-decimal token passes at
0.009 tokens) and ``INCRBY`` stops at 2**63 - 1 (9.2 tokens), so the budget scripts keep counters,
amounts and limits as decimal strings and add, subtract and compare them digit by digit. Both
backends refuse anything larger than ``MAX_EXACT_UNITS``, so a process with a memory store and a
fleet on Redis agree on every decision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.base import (
    BUDGET_GRACE_SECONDS,
    BudgetDecision,
    StoreUnavailable,
    TokenDecision,
    bucket_idle_ms,
    check_bucket,
    check_ttl,
    check_units,
    check_window,
)

__all__ = ["RedisStore"]

# Times inside scripts come from the server's TIME, so replicas with skewed clocks
# share one view of buckets and windows. Redis >= 5 replicates script effects, which makes TIME
# before a write allowed.

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] sorted set of one payer's holds, "<entry>:<amount>" scored by when each lapses;
# ARGV member, ttl_ms. Drops the lapsed, adds this one, returns every member alive.
_HOLD_SHARE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZRANGE', KEYS[1], 0, -1)
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
        owner_tag: str = "",
    ) -> None:
        self._prefix = prefix
        # ``serve --workers N``: "@<pid>" after each lock's owner, so the supervisor can release the
        # locks of a worker that died (gateway.cli.workers) instead of leaving them to lapse.
        self._owner_tag = owner_tag
        # No retries: a command that timed out may have run, and re-sending a SET NX, a token take
        # or a budget increment would refuse our own lock or count twice. Fail fast; answer 503.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=op_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._extend = self._redis.register_script(_EXTEND_LUA)
        self._take_token = self._redis.register_script(_TAKE_TOKEN_LUA)
        self._reserve_budget = self._redis.register_script(_RESERVE_BUDGET_LUA)
        self._release_budget = self._redis.register_script(_RELEASE_BUDGET_LUA)
        self._hold_share = self._redis.register_script(_HOLD_SHARE_LUA)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool:
        check_ttl(ttl_ms)
        with _unavailable_on_redis_errors():
            return bool(await self._redis.set(self._key(key), owner + self._owner_tag, px=ttl_ms, nx=True))

    async def release(self, key: str, owner: str) -> bool:
        with _unavailable_on_redis_errors():
            return bool(await self._release(keys=[self._key(key)], args=[owner + self._owner_tag]))

    async def extend(self, key: str, owner: str, ttl_ms: int) -> bool:
        check_ttl(ttl_ms)
        with _unavailable_on_redis_errors():
            return bool(await self._extend(keys=[self._key(key)], args=[owner + self._owner_tag, ttl_ms]))

    async def holder(self, key: str) -> str | None:
        value = await self.get(key)
        if value is None:
            return None
        owner = value.decode()
        return owner[: -len(self._owner_tag)] if self._owner_tag and owner.endswith(self._owner_tag) else owner

    async def get(self, key: str) -> bytes | None:
        with _unavailable_on_redis_errors():
            value = await self._redis.get(self._key(key))
        # the client is built without decode_responses, so replies are bytes
        return cast("bytes | None", value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with _unavailable_on_redis_errors():
            values = await self._redis.mget([self._key(key) for key in keys])
        return cast("list[bytes | None]", list(values))

    async def put(
        self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False
    ) -> bool:
        if ttl_ms is not None:
            check_ttl(ttl_ms)
        with _unavailable_on_redis_errors():
            return bool(await self._redis.set(self._key(key), value, px=ttl_ms, nx=only_if_absent))

    async def delete(self, key: str) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.delete(self._key(key))

    async def take_token(self, key: str, rate_per_second: float, burst: int, cost: int = 1) -> TokenDecision:
        check_bucket(rate_per_second, burst, cost)
        args: list[str | int] = [repr(float(rate_per_second)), burst, cost, bucket_idle_ms(rate_per_second, burst)]
        with _unavailable_on_redis_errors():
            allowed, tokens, retry_after = await self._take_token(keys=[self._key(key)], args=args)
        return TokenDecision(bool(allowed), math.floor(float(tokens)), float(retry_after))

    async def reserve_budget(self, key: str, amount: int, limit: int, window_seconds: int) -> BudgetDecision:
        check_units("amount", amount)
        check_units("limit", limit)
        check_window(window_seconds)
        args: list[str | int] = [str(amount), str(limit), window_seconds, BUDGET_GRACE_SECONDS]
        with _unavailable_on_redis_errors():
            allowed, used, resets_at = await self._reserve_budget(keys=[self._key(key)], args=args)
        return BudgetDecision(bool(allowed), int(used), limit, int(resets_at))

    async def release_budget(self, key: str, amount: int, window_seconds: int, resets_at: float) -> None:
        check_units("amount", amount)
        check_window(window_seconds)
        window_key = f"{self._key(key)}:{int(resets_at) - window_seconds}"
        with _unavailable_on_redis_errors():
            await self._release_budget(keys=[window_key], args=[str(amount)])

    async def hold_share(self, key: str, entry: str, amount: int, ttl_ms: int) -> list[int] | None:
        """A settlement's hold on a payer's balance, seen by every replica (``settlement.schemes.
        exact_guards.SharedHolds``); the amounts of the others alive. None when Redis cannot say:
        the caller then counts its own process's holds, as it did before this was shared."""
        check_ttl(ttl_ms)
        check_units("amount", amount)
        mine = f"{entry}:{amount}"
        try:
            members = await self._hold_share(keys=[self._key(f"holds:{key}")], args=[mine, ttl_ms])
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError):
            return None
        others: list[int] = []
        for member in cast("list[bytes]", members):
            text = member.decode()
            value = text.rpartition(":")[2]
            if text != mine and value.isdigit():
                others.append(int(value))
        return others

    async def drop_share(self, key: str, entry: str, amount: int) -> None:
        """The hold's end; one left behind (Redis unreachable, the process killed) lapses by itself."""
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError):
            await self._redis.zrem(self._key(f"holds:{key}"), f"{entry}:{amount}")

    async def keep_held(self, key: str, ttl_ms: int) -> None:
        """An authorization whose settlement's outcome is unknown, named for every replica
        (``SharedHolds``); best effort: Redis unreachable, the process's own hold still counts."""
        check_ttl(ttl_ms)
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError):
            await self._redis.set(self._key(f"kept:{key}"), b"1", px=ttl_ms)

    async def is_held(self, key: str) -> bool | None:
        try:
            return bool(await self._redis.exists(self._key(f"kept:{key}")))
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError):
            return None

    async def ping(self) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
