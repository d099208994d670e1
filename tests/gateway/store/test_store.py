"""The state store: locks, values, token buckets and budgets behave alike on memory and Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.exceptions

from gateway.store import (
    MAX_EXACT_UNITS,
    MemoryStore,
    RedisStore,
    StateStore,
    StoreUnavailable,
    create_store,
    taking_turns,
)
from tests.gateway.conftest import REDIS_URL, StoreBackend

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


async def wait_until_absent(store: StateStore, key: str, deadline_seconds: float = 5.0) -> None:
    """Poll until a TTL has lapsed on the server; bounded, and asserts nothing about timing."""
    give_up = time.monotonic() + deadline_seconds
    while await store.holder(key) is not None:
        assert time.monotonic() < give_up, f"{key} never expired"
        await asyncio.sleep(0.01)


async def lapse(backend: StoreBackend, store: StateStore, key: str, ttl_ms: int) -> None:
    if backend.clock is not None:
        backend.clock.advance(ttl_ms / 1000)
    else:
        await wait_until_absent(store, key)


# -- locks


def test_lock_is_exclusive_until_released(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.acquire("pay:1", "replica-a", 30_000)
        assert not await store.acquire("pay:1", "replica-b", 30_000)
        assert not await store.acquire("pay:1", "replica-a", 30_000)  # not re-entrant
        assert await store.holder("pay:1") == "replica-a"
        assert await store.release("pay:1", "replica-a")
        assert await store.holder("pay:1") is None
        assert await store.acquire("pay:1", "replica-b", 30_000)

    store_backend.run(body)


def test_release_by_non_owner_is_refused(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.acquire("pay:2", "replica-a", 30_000)
        assert not await store.release("pay:2", "replica-b")
        assert await store.holder("pay:2") == "replica-a"
        assert not await store.release("pay:absent", "replica-a")

    store_backend.run(body)


def test_lock_expires_and_a_late_release_leaves_the_new_holder_alone(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.acquire("pay:3", "replica-a", 50)
        await lapse(store_backend, store, "pay:3", 50)
        assert await store.holder("pay:3") is None
        assert await store.acquire("pay:3", "replica-b", 30_000)
        assert not await store.release("pay:3", "replica-a")
        assert await store.holder("pay:3") == "replica-b"

    store_backend.run(body)


def test_lock_ttl_must_be_positive(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        with pytest.raises(ValueError):
            await store.acquire("pay:4", "replica-a", 0)

    store_backend.run(body)


# -- values


def test_put_get_delete(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.get("idem:1") is None
        assert await store.put("idem:1", b"first")
        assert await store.put("idem:1", b"second")
        assert await store.get("idem:1") == b"second"
        await store.delete("idem:1")
        assert await store.get("idem:1") is None
        await store.delete("idem:1")  # deleting nothing is fine

    store_backend.run(body)


def test_put_only_if_absent_keeps_the_first_value(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.put("idem:2", b"first", only_if_absent=True)
        assert not await store.put("idem:2", b"second", only_if_absent=True)
        assert await store.get("idem:2") == b"first"

    store_backend.run(body)


def test_put_with_ttl_expires(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.put("idem:3", b"v", ttl_ms=50)
        await lapse(store_backend, store, "idem:3", 50)
        assert await store.get("idem:3") is None
        assert await store.put("idem:3", b"again", only_if_absent=True)

    store_backend.run(body)


def test_concurrent_put_only_if_absent_has_one_winner(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        results = await asyncio.gather(
            *(store.put("idem:4", str(i).encode(), 30_000, only_if_absent=True) for i in range(30))
        )
        assert sum(results) == 1
        winner = results.index(True)
        assert await store.get("idem:4") == str(winner).encode()

    store_backend.run(body)


# -- token buckets


def test_bucket_allows_the_burst_then_refuses_with_retry_after(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        decisions = [await store.take_token("rl:1", rate_per_second=0.5, burst=3) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, True]
        assert [d.remaining for d in decisions] == [2, 1, 0]
        refused = await store.take_token("rl:1", rate_per_second=0.5, burst=3)
        assert not refused.allowed
        assert refused.remaining == 0
        assert 0 < refused.retry_after_seconds <= 2.0  # one token at 0.5/s

    store_backend.run(body)


def test_bucket_cost_takes_several_tokens(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert (await store.take_token("rl:2", 0.5, burst=5, cost=4)).remaining == 1
        refused = await store.take_token("rl:2", 0.5, burst=5, cost=2)
        assert not refused.allowed
        assert refused.remaining == 1
        assert (await store.take_token("rl:2", 0.5, burst=5, cost=1)).allowed

    store_backend.run(body)


def test_bucket_refuses_impossible_settings(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        with pytest.raises(ValueError):
            await store.take_token("rl:3", 1.0, burst=2, cost=3)
        with pytest.raises(ValueError):
            await store.take_token("rl:3", 0.0, burst=2)

    store_backend.run(body)


def test_bucket_refills_with_elapsed_time_up_to_the_burst() -> None:
    clock = [1000.0]
    store = MemoryStore(clock=lambda: clock[0])

    async def body() -> None:
        for _ in range(4):
            assert (await store.take_token("rl:4", rate_per_second=2.0, burst=4)).allowed
        refused = await store.take_token("rl:4", rate_per_second=2.0, burst=4)
        assert not refused.allowed
        assert refused.retry_after_seconds == 0.5
        clock[0] += 0.5
        refilled = await store.take_token("rl:4", rate_per_second=2.0, burst=4)
        assert refilled.allowed and refilled.remaining == 0
        clock[0] += 3600
        assert (await store.take_token("rl:4", rate_per_second=2.0, burst=4)).remaining == 3

    asyncio.run(body())


def test_redis_bucket_refills_from_server_time(redis_prefix: str) -> None:
    async def body() -> None:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            assert (await store.take_token("rl:5", rate_per_second=50.0, burst=1)).allowed
            give_up = time.monotonic() + 5.0
            while not (await store.take_token("rl:5", rate_per_second=50.0, burst=1)).allowed:
                assert time.monotonic() < give_up, "bucket never refilled"
                await asyncio.sleep(0.005)
        finally:
            await store.close()

    asyncio.run(body())


# -- budgets


def test_concurrent_reservations_never_pass_the_limit(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        decisions = await asyncio.gather(
            *(store.reserve_budget("budget:1", amount=2, limit=10, window_seconds=3600) for _ in range(50))
        )
        assert sum(d.allowed for d in decisions) == 5
        assert max(d.used for d in decisions) == 10
        refused = [d for d in decisions if not d.allowed]
        assert all(d.used == 10 and d.limit == 10 for d in refused)

    store_backend.run(body)


def test_two_replicas_in_two_threads_share_one_budget(redis_prefix: str) -> None:
    start = threading.Barrier(2)
    allowed: list[int] = []
    errors: list[BaseException] = []

    async def replica() -> int:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)  # own pool, own connections
        try:
            await store.ping()  # connect before the race so both fire together
            start.wait(timeout=10)
            decisions = await asyncio.gather(
                *(store.reserve_budget("budget:2", amount=2, limit=10, window_seconds=3600) for _ in range(50))
            )
            return sum(d.allowed for d in decisions)
        finally:
            await store.close()

    def thread_main() -> None:
        try:
            allowed.append(asyncio.run(replica()))
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert len(allowed) == 2
    assert sum(allowed) == 5


def test_refused_reservation_changes_nothing(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert (await store.reserve_budget("budget:3", 7, limit=10, window_seconds=60)).used == 7
        refused = await store.reserve_budget("budget:3", 4, limit=10, window_seconds=60)
        assert not refused.allowed and refused.used == 7
        fits = await store.reserve_budget("budget:3", 3, limit=10, window_seconds=60)
        assert fits.allowed and fits.used == 10

    store_backend.run(body)


def test_release_budget_gives_capacity_back_but_never_below_zero(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        first = await store.reserve_budget("budget:4", 6, limit=10, window_seconds=3600)
        assert not (await store.reserve_budget("budget:4", 6, limit=10, window_seconds=3600)).allowed
        await store.release_budget("budget:4", 6, window_seconds=3600, resets_at=first.resets_at)
        again = await store.reserve_budget("budget:4", 6, limit=10, window_seconds=3600)
        assert again.allowed and again.used == 6
        await store.release_budget("budget:4", 100, window_seconds=3600, resets_at=first.resets_at)
        full = await store.reserve_budget("budget:4", 10, limit=10, window_seconds=3600)
        assert full.allowed and full.used == 10

    store_backend.run(body)


def test_release_into_a_forgotten_window_is_a_no_op(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        await store.release_budget("budget:5", 5, window_seconds=60, resets_at=1_000_000_020)
        decision = await store.reserve_budget("budget:5", 1, limit=10, window_seconds=60)
        assert decision.used == 1

    store_backend.run(body)
    if store_backend.prefix:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            assert not client.exists(f"{store_backend.prefix}budget:5:1000000000")
        finally:
            client.close()


def test_memory_resets_at_is_the_end_of_the_epoch_aligned_window() -> None:
    clock = [1_700_000_123.75]
    store = MemoryStore(wall_clock=lambda: clock[0])

    async def body() -> None:
        decision = await store.reserve_budget("budget:6", 10, limit=10, window_seconds=60)
        assert decision.resets_at == 1_700_000_160
        assert not (await store.reserve_budget("budget:6", 1, limit=10, window_seconds=60)).allowed
        clock[0] = 1_700_000_160.0  # the next window starts empty
        fresh = await store.reserve_budget("budget:6", 1, limit=10, window_seconds=60)
        assert fresh.allowed and fresh.used == 1 and fresh.resets_at == 1_700_000_220

    asyncio.run(body())


def test_redis_resets_at_is_the_end_of_the_server_window(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)

    async def body() -> int:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            return (await store.reserve_budget("budget:7", 1, limit=10, window_seconds=3600)).resets_at
        finally:
            await store.close()

    try:
        before = client.time()[0]
        resets_at = asyncio.run(body())
        after = client.time()[0]
        assert resets_at % 3600 == 0
        assert before < resets_at and resets_at - 3600 <= after
        window_key = f"{redis_prefix}budget:7:{resets_at - 3600}"
        assert client.get(window_key) == b"1"
        assert 0 < client.ttl(window_key) <= resets_at + 60 - before
    finally:
        client.close()


def test_budget_amounts_are_exact_up_to_2_pow_256_minus_1(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert MAX_EXACT_UNITS == 2**256 - 1  # every amount a token can move
        with pytest.raises(ValueError):
            await store.reserve_budget("budget:8", 1, limit=MAX_EXACT_UNITS + 1, window_seconds=60)
        with pytest.raises(ValueError):
            await store.reserve_budget("budget:8", MAX_EXACT_UNITS + 1, limit=10, window_seconds=60)
        with pytest.raises(ValueError):
            await store.reserve_budget("budget:8", -1, limit=10, window_seconds=60)
        with pytest.raises(TypeError):
            await store.reserve_budget("budget:8", 1.5, limit=10, window_seconds=60)  # type: ignore[arg-type]
        almost = await store.reserve_budget("budget:8", MAX_EXACT_UNITS - 1, MAX_EXACT_UNITS, 3600)
        assert almost.allowed and almost.used == MAX_EXACT_UNITS - 1
        assert not (await store.reserve_budget("budget:8", 2, MAX_EXACT_UNITS, 3600)).allowed
        last = await store.reserve_budget("budget:8", 1, MAX_EXACT_UNITS, 3600)
        assert last.allowed and last.used == MAX_EXACT_UNITS
        await store.release_budget("budget:8", MAX_EXACT_UNITS - 2, 3600, last.resets_at)
        assert (await store.reserve_budget("budget:8", 0, MAX_EXACT_UNITS, 3600)).used == 2

    store_backend.run(body)


# 18-decimal tokens (DAI, WETH): 0.01 token is 10**16 atomic units, past 2**53 (doubles) and a
# 500-token budget is 5 * 10**20, past 2**63 (Redis INCRBY). Odd amounts: a double would round them.
CENT_18 = 10**16 + 1
TOKENS_500 = 500 * 10**18 + 7


def test_18_decimal_budgets_are_exact_past_2_pow_53_and_2_pow_63(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        assert CENT_18 > 2**53 and TOKENS_500 > 2**63
        first = await store.reserve_budget("budget:18", CENT_18, limit=TOKENS_500, window_seconds=3600)
        assert first.allowed and first.used == CENT_18 and first.limit == TOKENS_500
        big = TOKENS_500 - 2 * CENT_18
        second = await store.reserve_budget("budget:18", big, limit=TOKENS_500, window_seconds=3600)
        assert second.allowed and second.used == TOKENS_500 - CENT_18
        # one unit too many is refused, and changes nothing
        over = await store.reserve_budget("budget:18", CENT_18 + 1, limit=TOKENS_500, window_seconds=3600)
        assert not over.allowed and over.used == TOKENS_500 - CENT_18
        exact = await store.reserve_budget("budget:18", CENT_18, limit=TOKENS_500, window_seconds=3600)
        assert exact.allowed and exact.used == TOKENS_500
        assert not (await store.reserve_budget("budget:18", 1, limit=TOKENS_500, window_seconds=3600)).allowed
        # releases are exact too, and never below zero
        await store.release_budget("budget:18", big, 3600, exact.resets_at)
        after = await store.reserve_budget("budget:18", 0, limit=TOKENS_500, window_seconds=3600)
        assert after.used == 2 * CENT_18
        await store.release_budget("budget:18", TOKENS_500, 3600, exact.resets_at)
        assert (await store.reserve_budget("budget:18", 0, limit=TOKENS_500, window_seconds=3600)).used == 0

    store_backend.run(body)


def test_concurrent_18_decimal_reservations_never_pass_the_limit(store_backend: StoreBackend) -> None:
    limit = 7 * CENT_18 + CENT_18 - 1  # room for exactly 7

    async def body(store: StateStore) -> None:
        decisions = await asyncio.gather(
            *(store.reserve_budget("budget:19", CENT_18, limit=limit, window_seconds=3600) for _ in range(40))
        )
        assert sum(d.allowed for d in decisions) == 7
        assert sorted(d.used for d in decisions if d.allowed) == [n * CENT_18 for n in range(1, 8)]
        assert all(d.used == 7 * CENT_18 for d in decisions if not d.allowed)

    store_backend.run(body)


def test_two_replicas_share_one_18_decimal_budget_exactly(redis_prefix: str) -> None:
    start = threading.Barrier(3)
    allowed: list[int] = []
    errors: list[BaseException] = []
    limit = 9 * TOKENS_500 // 10  # 450 tokens and change: room for 4 of 100-token calls, 50 left

    async def replica() -> int:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            await store.ping()
            start.wait(timeout=10)
            decisions = await asyncio.gather(
                *(store.reserve_budget("budget:20", TOKENS_500 // 5, limit=limit, window_seconds=3600)
                  for _ in range(20))
            )
            return sum(d.allowed for d in decisions)
        finally:
            await store.close()

    def thread_main() -> None:
        try:
            allowed.append(asyncio.run(replica()))
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert sum(allowed) == 4

    async def used() -> int:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            return (await store.reserve_budget("budget:20", 0, limit=limit, window_seconds=3600)).used
        finally:
            await store.close()

    assert asyncio.run(used()) == 4 * (TOKENS_500 // 5)


# -- keys, outages, construction


def test_redis_keys_carry_the_prefix(redis_prefix: str) -> None:
    async def body() -> None:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            await store.put("idem:9", b"v")
        finally:
            await store.close()

    asyncio.run(body())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.get(f"{redis_prefix}idem:9") == b"v"
        assert client.get("idem:9") is None
    finally:
        client.close()


@pytest.mark.parametrize("operation", ["ping", "acquire", "get", "take_token", "reserve_budget"])
def test_unreachable_redis_raises_store_unavailable(operation: str) -> None:
    async def body() -> None:
        store = RedisStore(CLOSED_PORT_URL, prefix="x402gw-test-unreachable:")
        try:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "ping": store.ping,
                "acquire": lambda: store.acquire("k", "owner", 1000),
                "get": lambda: store.get("k"),
                "take_token": lambda: store.take_token("k", 1.0, 1),
                "reserve_budget": lambda: store.reserve_budget("k", 1, 10, 60),
            }
            with pytest.raises(StoreUnavailable) as raised:
                await calls[operation]()
            assert raised.value.code == "store_unavailable"
            assert "127.0.0.1" not in str(raised.value) and ":1" not in str(raised.value)
            assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
        finally:
            await store.close()

    asyncio.run(body())


def test_create_store_picks_the_backend() -> None:
    assert isinstance(create_store(None, "x402gw:"), MemoryStore)
    store = create_store(REDIS_URL, "x402gw-test-create:")
    assert isinstance(store, RedisStore)
    asyncio.run(store.close())


# -- holds on a payer's balance, shared by replicas (settlement.schemes.exact_guards.SharedHolds)


def test_redis_holds_are_seen_by_every_replica_and_dropped(redis_prefix: str) -> None:
    async def body() -> None:
        one, two = RedisStore(REDIS_URL, prefix=redis_prefix), RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            assert await one.hold_share("net:tok:payer", "a-1", 10**30, 60_000) == []
            assert await two.hold_share("net:tok:payer", "b-1", 5, 60_000) == [10**30]  # exact past 2**53
            assert sorted(await one.hold_share("net:tok:payer", "a-2", 7, 60_000)) == [5, 10**30]
            assert await two.hold_share("net:tok:other", "b-2", 1, 60_000) == []  # per payer
            await one.drop_share("net:tok:payer", "a-1", 10**30)
            assert sorted(await two.hold_share("net:tok:payer", "b-3", 1, 60_000)) == [5, 7]
        finally:
            await one.close()
            await two.close()

    asyncio.run(body())


def test_a_redis_hold_left_behind_lapses(redis_prefix: str) -> None:
    """A worker killed mid-settlement never drops its hold: once lapsed, it no longer counts."""
    async def body() -> None:
        store = RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            key = f"{redis_prefix}holds:net:tok:payer"
            client = redis.Redis.from_url(REDIS_URL)
            seconds, micros = client.time()
            client.zadd(key, {"dead-1:100": seconds * 1000 + micros // 1000 - 1})  # lapsed a millisecond ago
            client.zadd(key, {"live-1:50": seconds * 1000 + 60_000})
            assert await store.hold_share("net:tok:payer", "new-1", 1, 60_000) == [50]
            assert client.zscore(key, "dead-1:100") is None and 0 < client.pttl(key) <= 60_000
            client.close()
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_holds_say_unknown_when_redis_is_away() -> None:
    async def body() -> None:
        store = RedisStore(CLOSED_PORT_URL, connect_timeout=0.2)
        try:
            assert await store.hold_share("net:tok:payer", "a-1", 1, 60_000) is None
            await store.drop_share("net:tok:payer", "a-1", 1)  # nothing to say: it lapses by itself
        finally:
            await store.close()

    asyncio.run(body())


# -- turns of a periodic job (the background resolver of pending payments)


def test_one_process_of_those_sharing_redis_has_the_turn_and_another_takes_over_when_it_lapses(redis_prefix: str) -> None:
    async def body() -> None:
        one, two = RedisStore(REDIS_URL, prefix=redis_prefix), RedisStore(REDIS_URL, prefix=redis_prefix)
        try:
            first, second = taking_turns(one, "job", 10), taking_turns(two, "job", 10)
            assert [await first(), await second(), await first(), await second()] == [True, False, True, False]
            client = redis.Redis.from_url(REDIS_URL)
            assert 10_000 < client.pttl(f"{redis_prefix}turn:job") <= 15_000  # kept for a round and a half
            client.delete(f"{redis_prefix}turn:job")  # its holder died: the lock lapsed
            client.close()
            assert [await second(), await first()] == [True, False]
        finally:
            await one.close()
            await two.close()

    asyncio.run(body())


def test_with_the_store_away_every_process_runs_its_rounds() -> None:
    async def body() -> None:
        store = RedisStore(CLOSED_PORT_URL, connect_timeout=0.2)
        try:
            assert await taking_turns(store, "job", 10)() is True
        finally:
            await store.close()

    asyncio.run(body())
