"""``exact_guards`` alone: what ``InFlight`` holds and gives back, when it reads the chain, and that
``transfer_refusal`` costs an EOA nothing. Against anvil: tests/e2e/test_attacks_gas.py."""

from __future__ import annotations

import asyncio

import pytest

from settlement.chain.rpc import RpcError
from settlement.errors import ChainUnavailable
from settlement.schemes.eip712 import TransferAuthorization
from settlement.schemes.exact_guards import InFlight, in_flight_refusal, is_revert, transfer_refusal
from settlement.x402.wire import SettleResponse

NET, TOKEN, PAYER = "eip155:31337", "0x" + "aa" * 20, "0x" + "bB" * 20


async def unmined() -> bool:
    return False


async def mined() -> bool:
    return True


class Balance:
    def __init__(self, balance: int | None, code: bytes = b"") -> None:
        self.balance, self.reads, self.code = balance, 0, code

    async def get_code(self, address: str) -> bytes:
        return self.code

    async def balance_of(self, token: str, owner: str) -> int:
        self.reads += 1
        if self.balance is None:
            raise ChainUnavailable("the node is away")
        return self.balance


def test_a_payers_first_settlement_reads_nothing_and_later_ones_read_the_balance() -> None:
    flights, chain = InFlight(), Balance(250)

    async def run() -> list[bool]:
        seen = []
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as first:
            seen.append(first.covered)
            assert chain.reads == 0 and await flights.pending(NET, TOKEN.upper(), PAYER.lower()) == 100
            async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:  # 200 <= 250
                seen.append(second.covered)
                async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:  # 300 > 250: would revert
                    seen.append(third.covered)
        return seen

    assert asyncio.run(run()) == [True, True, False]
    # the second: one balance read (it covers both); the third: not covered, so the others' states, then the balance again
    assert chain.reads == 3 and asyncio.run(flights.pending(NET, TOKEN, PAYER)) == 0 and not flights._held  # nothing left behind


def test_a_hold_is_given_back_when_its_settlement_raises() -> None:
    flights = InFlight()

    async def run() -> None:
        async with flights.hold(Balance(0), NET, TOKEN, PAYER, 100, unmined):
            raise RuntimeError("the broadcast failed")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert asyncio.run(flights.pending(NET, TOKEN, PAYER)) == 0


def test_a_balance_read_that_fails_lets_the_settlement_through() -> None:
    flights = InFlight()

    async def run() -> bool:
        async with flights.hold(Balance(None), NET, TOKEN, PAYER, 100, unmined), flights.hold(Balance(None), NET, TOKEN, PAYER, 100, unmined) as second:
            return second.covered

    assert asyncio.run(run()) is True  # as before the guard: the chain decides


def test_an_account_without_code_is_not_simulated() -> None:
    class NoCalls:
        settlement_address = None

        async def get_code(self, address: str) -> bytes:
            raise AssertionError("verify read the code already")

        async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes:
            raise AssertionError("an EOA's transfer is not simulated")

    auth = TransferAuthorization(from_=PAYER, to="0x" + "cc" * 20, value=1, valid_after=0, valid_before=2**40, nonce=bytes(32))
    assert asyncio.run(transfer_refusal(NoCalls(), b"", TOKEN, auth, bytes(65))) is None


def test_a_settlement_already_mined_is_not_counted_twice() -> None:
    """The balance read shows a mined settlement spent: while its receipt is still on its way here,
    it is not counted against the balance again."""
    flights, chain = InFlight(), Balance(100)  # 200 held before, 100 of it mined: 100 left

    async def run() -> bool:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, mined), \
                flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            assert second.covered  # 100 left covers it: the first is mined
            async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:
                return third.covered  # the second is not mined: 100 + 100 > 100

    assert asyncio.run(run()) is False


@pytest.mark.parametrize(("message", "revert"), [
    ("execution reverted: ERC20: transfer amount exceeds balance", True), ("EVM error OutOfGas", True),
    ("out of gas", True), ("rate limit exceeded", False), ("header not found", False), ("request timed out", False),
    (None, False),
])
def test_only_a_revert_says_a_call_would_fail(message: str | None, revert: bool) -> None:
    assert is_revert(message) is revert


def test_a_simulation_the_node_cannot_run_now_is_unknown_not_a_refusal() -> None:
    class RateLimited:
        settlement_address = None

        async def get_code(self, address: str) -> bytes:
            return b"\xef\x01\x00" + bytes(20)

        async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes:
            raise RpcError("eth_call", "rate limit exceeded")

    auth = TransferAuthorization(from_=PAYER, to="0x" + "cc" * 20, value=1, valid_after=0, valid_before=2**40, nonce=bytes(32))
    with pytest.raises(RpcError):  # a ChainUnavailable: 503, retryable; never "invalid signature"
        asyncio.run(transfer_refusal(RateLimited(), b"\xef\x01\x00" + bytes(20), TOKEN, auth, bytes(65)))


class Shared:
    """A shared store's holds as ``SharedHolds`` sees them, for several processes; ``None``: away."""

    def __init__(self) -> None:
        self.holds: dict[str, dict[str, int]] = {}
        self.kept: dict[str, int] = {}  # authorization -> its TTL
        self.away = False

    async def hold_share(self, key: str, entry: str, amount: int, ttl_ms: int) -> list[int] | None:
        if self.away:
            return None
        held = self.holds.setdefault(key, {})
        held[entry] = amount
        return [value for name, value in held.items() if name != entry]

    async def drop_share(self, key: str, entry: str, amount: int) -> None:
        self.holds.get(key, {}).pop(entry, None)

    async def keep_held(self, key: str, ttl_ms: int) -> None:
        if not self.away:
            self.kept[key] = ttl_ms

    async def is_held(self, key: str) -> bool | None:
        return None if self.away else key in self.kept


def test_two_processes_sharing_a_store_count_each_others_settlements_in_flight() -> None:
    """Worker A holds one price of a balance of one price; worker B's settlement of the same payer
    is refused (it would revert on the gateway's gas); once A's ends, B's goes through."""
    shared, chain = Shared(), Balance(100)
    worker_a, worker_b = InFlight(shared), InFlight(shared)

    async def run() -> list[bool]:
        seen = []
        async with worker_a.hold(chain, NET, TOKEN, PAYER, 100, unmined) as first:
            seen.append(first.covered)
            async with worker_b.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
                seen.append(second.covered)
        async with worker_b.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:
            seen.append(third.covered)
        return seen

    assert asyncio.run(run()) == [True, False, True]
    assert not any(shared.holds.values())  # every hold dropped


def test_a_process_without_the_store_still_counts_its_own() -> None:
    shared, chain = Shared(), Balance(100)
    shared.away = True
    flights = InFlight(shared)

    async def run() -> bool:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined), \
                flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            return second.covered

    assert asyncio.run(run()) is False


def test_this_processs_mined_settlement_is_not_counted_twice_through_the_store() -> None:
    """The store lists this process's own holds too; one of them mined shows in the balance read and
    is taken off, while another process's (whose state only it can read) still counts."""
    shared, chain = Shared(), Balance(200)  # 300 held before, 100 of it mined here: 200 left
    here, elsewhere = InFlight(shared), InFlight(shared)

    async def run() -> bool:
        async with here.hold(chain, NET, TOKEN, PAYER, 100, mined), \
                elsewhere.hold(chain, NET, TOKEN, PAYER, 100, unmined), \
                here.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:
            return third.covered

    assert asyncio.run(run())  # 200 left >= elsewhere's 100 + this 100; counted twice, the mined one would refuse it


def test_a_shared_hold_outlives_its_settlements_wait_for_a_receipt() -> None:
    """A hold that lapsed while its settlement is still waiting for its receipt would let another
    process broadcast one the balance no longer covers."""
    seen: list[int] = []

    class Recording(Shared):
        async def hold_share(self, key: str, entry: str, amount: int, ttl_ms: int) -> list[int] | None:
            seen.append(ttl_ms)
            return await super().hold_share(key, entry, amount, ttl_ms)

    async def run(receipt_timeout: float) -> None:
        async with InFlight(Recording(), ttl_ms=InFlight.ttl_for(receipt_timeout)).hold(Balance(100), NET, TOKEN, PAYER, 1, unmined):
            pass

    asyncio.run(run(30))
    asyncio.run(run(600))
    assert seen[0] >= 2 * 30_000 and seen[1] >= 2 * 600_000


def pending_answer() -> SettleResponse:
    return SettleResponse(success=False, error_reason="settlement_pending", transaction="0x" + "ab" * 32, network=NET)


def test_a_settlement_whose_outcome_is_unknown_keeps_its_hold_until_it_lapses() -> None:
    """Broadcast but not known final: its transaction may still land. Dropped, the next settlement of
    the same balance would be broadcast beside it and revert on the gateway's gas."""
    shared, chain = Shared(), Balance(100)
    flights = InFlight(shared, ttl_ms=50)

    async def run() -> list[object]:
        later: list[tuple[float, object, tuple[object, ...]]] = []
        loop = asyncio.get_running_loop()
        loop.call_later = lambda delay, callback, *args: later.append((delay, callback, args))  # type: ignore[method-assign,assignment]
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as first:
            first.judged(pending_answer())
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            kept = [second.covered, bool(any(shared.holds.values()))]  # refused; the shared entry left to lapse
        [(delay, drop, args)] = later
        drop(*args)  # type: ignore[operator]  # the hold's lifetime is over: here, and in the store (its TTL)
        shared.holds.clear()
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:
            return [*kept, delay, third.covered]

    assert asyncio.run(run()) == [False, True, 0.05, True]


def test_a_settlement_cancelled_midway_keeps_its_hold() -> None:
    """A request cancelled while its item waits in a batch (or its transaction is on its way) leaves
    the settlement running: its hold stays."""
    flights, chain = InFlight(), Balance(100)

    async def run() -> bool:
        async def settling() -> None:
            async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined):
                await asyncio.Event().wait()

        task = asyncio.create_task(settling())
        while not flights._held:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            return second.covered

    assert asyncio.run(run()) is False


def test_a_settled_or_refused_settlement_drops_its_hold() -> None:
    flights, chain = InFlight(), Balance(100)

    async def run() -> bool:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as first:
            first.judged(SettleResponse(success=False, error_reason="insufficient_funds", network=NET))
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            return second.covered

    assert asyncio.run(run()) is True and not flights._held


def test_an_authorization_whose_outcome_is_unknown_is_held_for_every_process() -> None:
    """Worker A's settlement went pending (in the pool, its request answered 503, its payment lock
    released): worker B, asked to settle the same authorization (the served facilitator API), is told
    it is held, as A is; another nonce of the same payer is not. A store that cannot say: held."""
    shared, chain = Shared(), Balance(1000)
    worker_a, worker_b = InFlight(shared, ttl_ms=60_000), InFlight(shared)
    nonce, other = b"\x01" * 32, b"\x02" * 32

    async def run() -> list[bool]:
        asyncio.get_running_loop().call_later = lambda *args: None  # type: ignore[method-assign,assignment,return-value]
        before = await worker_b.holds(NET, TOKEN, PAYER, nonce)
        async with worker_a.hold(chain, NET, TOKEN, PAYER, 100, unmined, nonce) as held:
            held.judged(pending_answer())
        seen = [await worker.holds(NET, TOKEN, PAYER.lower(), nonce) for worker in (worker_a, worker_b)]
        shared.away = True
        away = await worker_b.holds(NET, TOKEN, PAYER, other)
        shared.away = False
        return [before, *seen, await worker_b.holds(NET, TOKEN, PAYER, other), away]

    assert asyncio.run(run()) == [False, True, True, False, True]
    assert list(shared.kept.values()) == [60_000]  # lapses with the hold's lifetime


def test_a_settled_authorization_is_not_held_for_the_others() -> None:
    shared, chain = Shared(), Balance(1000)
    worker_a, worker_b = InFlight(shared), InFlight(shared)

    async def run() -> bool:
        async with worker_a.hold(chain, NET, TOKEN, PAYER, 100, unmined, b"\x01" * 32) as held:
            held.judged(SettleResponse(success=True, transaction="0x" + "ab" * 32, network=NET))
        return await worker_b.holds(NET, TOKEN, PAYER, b"\x01" * 32)

    assert asyncio.run(run()) is False and shared.kept == {}


def reverted(reason: str = "transaction_failed") -> SettleResponse:
    return SettleResponse(success=False, error_reason=reason, transaction="0x" + "cd" * 32, network=NET)


def test_a_payer_whose_code_made_a_settlement_revert_is_refused_everywhere_and_others_are_not() -> None:
    """Code can tell an eth_call from the mined transaction: every check passes, the settlement
    reverts on the gateway's gas, round after round. After one such revert the payer is struck, in
    this process and (through the store) in the others; for an hour, not for ever."""
    shared, wallet = Shared(), Balance(1000, code=b"\xef\x01\x00" + bytes(20))
    here, there = InFlight(shared), InFlight(shared)

    async def run() -> list[object]:
        async with here.hold(wallet, NET, TOKEN, PAYER, 100, unmined) as first:
            first.judged(reverted())
        seen = [await here.struck(NET, PAYER), await there.struck(NET, PAYER.lower()), await there.struck(NET, "0x" + "cc" * 20)]
        async with there.hold(wallet, NET, TOKEN, PAYER, 100, unmined) as second:  # a verify that raced the strike
            refused = (second.covered, second.reason)
        return [*seen, refused, in_flight_refusal(PAYER, NET, second.reason).error_reason]

    assert asyncio.run(run()) == [True, True, False, (False, "payer_code_reverted"), "payer_code_reverted"]
    assert list(shared.kept.values()) == [3_600_000]


@pytest.mark.parametrize("response", [
    reverted("invalid_exact_evm_insufficient_balance"),  # explained: its balance went elsewhere
    reverted("invalid_exact_evm_nonce_already_used"),
    SettleResponse(success=False, error_reason="transaction_failed", network=NET),  # never mined: no gas of ours spent
    SettleResponse(success=True, transaction="0x" + "ab" * 32, network=NET),
], ids=["balance", "nonce", "not-mined", "settled"])
def test_only_an_unexplained_mined_revert_strikes(response: SettleResponse) -> None:
    flights, wallet = InFlight(), Balance(1000, code=b"\x60\x00")

    async def run() -> bool:
        async with flights.hold(wallet, NET, TOKEN, PAYER, 100, unmined) as held:
            held.judged(response)
        return await flights.struck(NET, PAYER)

    assert asyncio.run(run()) is False


def test_an_account_without_code_is_never_struck() -> None:
    """An account without code cannot refuse on chain what it signed: an unexplained revert of its
    settlement is not its doing (a node's fault, a token's pause), and it keeps paying."""
    flights = InFlight()

    async def run() -> bool:
        async with flights.hold(Balance(1000), NET, TOKEN, PAYER, 100, unmined) as held:
            held.judged(reverted())
        return await flights.struck(NET, PAYER)

    assert asyncio.run(run()) is False


def test_a_strike_lapses_after_its_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    flights, now = InFlight(), [1000.0]
    monkeypatch.setattr("settlement.schemes.exact_guards.time.monotonic", lambda: now[0])

    async def run() -> list[bool]:
        async with flights.hold(Balance(1000, code=b"\x60\x00"), NET, TOKEN, PAYER, 100, unmined) as held:
            held.judged(reverted())
        struck = await flights.struck(NET, PAYER)
        now[0] += 3600.5
        return [struck, await flights.struck(NET, PAYER)]

    assert asyncio.run(run()) == [True, False]


def test_a_wallets_transfer_is_simulated_from_the_settlement_account_through_the_bytes_overload() -> None:
    """As the settlement is sent: a wallet whose code says yes only when ``tx.origin`` is not the
    settlement account (an ``eth_call`` without ``from`` runs with origin zero) is asked as it will
    be asked on chain."""
    calls: list[tuple[bytes, str | None]] = []

    class Recording:
        settlement_address = "0x" + "5e" * 20

        async def get_code(self, address: str) -> bytes:
            return b"\x60\x00"

        async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes:
            calls.append((data[:4], sender))
            return b""

    auth = TransferAuthorization(from_=PAYER, to="0x" + "cc" * 20, value=1, valid_after=0, valid_before=2**40, nonce=bytes(32))
    assert asyncio.run(transfer_refusal(Recording(), b"\x60\x00", TOKEN, auth, bytes(65), wallet_signature=b"\x01" * 96)) is None
    assert calls == [(bytes.fromhex("cf092995"), "0x" + "5e" * 20)]


def noted(flights: InFlight, balance: int, *, mark: tuple[int, float] | None = None) -> None:
    """What verify does around its balance read: the mark before sending it, the balance after."""
    flights.saw_balance(NET, TOKEN, PAYER, balance, flights.balance_mark(NET, TOKEN) if mark is None else mark)


def test_verifys_balance_read_spares_the_settlements_own_when_it_covers_them_all() -> None:
    flights, chain = InFlight(), Balance(250)
    noted(flights, 250)

    async def run() -> list[bool]:
        async with flights.hold(chain, NET, TOKEN.upper(), PAYER.lower(), 100, unmined) as first, \
                flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:  # 200 <= 250, as read a moment ago
            assert chain.reads == 0
            async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as third:  # 300 > 250: read, refused
                return [first.covered, second.covered, third.covered]

    assert asyncio.run(run()) == [True, True, False]
    assert chain.reads == 2  # only the third read the chain (the balance, the others' states, the balance)


def test_what_holds_gave_back_since_the_read_was_sent_is_taken_off_it() -> None:
    """Verify read 300 when nothing had been given back; then a settlement of 100 ended (it may have
    spent it: the chain now says 200). Two more of 100 each: 300 - 100 = 200 covers them, no read;
    a third: the estimate no longer covers it, the chain is read and it is refused."""
    flights, chain = InFlight(), Balance(200)
    mark = flights.balance_mark(NET, TOKEN)

    async def run() -> list[bool]:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, mined):  # alone: no read
            pass
        assert flights.balance_mark(NET, TOKEN)[0] == mark[0] + 100
        noted(flights, 300, mark=mark)  # sent before that settlement ended, answered after
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as a, \
                flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as b:
            assert chain.reads == 0
            async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as c:
                return [a.covered, b.covered, c.covered]

    assert asyncio.run(run()) == [True, True, False]
    assert chain.reads == 2


def test_another_tokens_or_payers_balance_or_an_old_one_is_not_used() -> None:
    flights, chain = InFlight(), Balance(10_000)
    now = [1000.0]
    flights.clock = lambda: now[0]
    flights.saw_balance(NET, "0x" + "cc" * 20, PAYER, 10_000, flights.balance_mark(NET, "0x" + "cc" * 20))  # another token
    flights.saw_balance(NET, TOKEN, "0x" + "dd" * 20, 10_000, flights.balance_mark(NET, TOKEN))  # another payer
    flights.saw_balance("eip155:1", TOKEN, PAYER, 10_000, flights.balance_mark("eip155:1", TOKEN))  # another network

    async def two() -> None:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined), flights.hold(chain, NET, TOKEN, PAYER, 100, unmined):
            pass

    asyncio.run(two())
    assert chain.reads == 1
    sent = flights.balance_mark(NET, TOKEN)
    now[0] += 0.3  # the read was sent longer than BALANCE_REUSE_SECONDS ago (answered just now)
    noted(flights, 10_000, mark=sent)
    asyncio.run(two())
    assert chain.reads == 2
    noted(flights, 10_000)
    asyncio.run(two())
    assert chain.reads == 2  # a fresh one is used


@pytest.mark.parametrize("store_answers", [True, False], ids=["store-up", "store-away"])
def test_with_a_shared_store_the_balance_is_always_read(store_answers: bool) -> None:
    """Other processes' settlements give back nothing here: a balance read before theirs ended would
    count what they spent as still there. So too when the store cannot say now (its holds unknown)."""
    shared, chain = Shared(), Balance(10_000)
    shared.away = not store_answers
    flights = InFlight(shared)
    noted(flights, 10_000)

    async def run() -> bool:
        async with flights.hold(chain, NET, TOKEN, PAYER, 100, unmined), \
                flights.hold(chain, NET, TOKEN, PAYER, 100, unmined) as second:
            return second.covered

    assert asyncio.run(run()) is True
    assert chain.reads == 1


def test_spending_outside_a_hold_counts_while_it_runs_and_is_given_back_when_it_ends() -> None:
    """A channel's deposit (``InFlight.spending``): the payer's other settlements count it while it
    runs, and its value is given back when its outcome is known; unknown, it stays for a hold's lifetime."""
    flights = InFlight(ttl_ms=60_000)

    async def run() -> tuple[int, int, int]:
        before = flights.balance_mark(NET, TOKEN)[0]
        async with flights.spending(NET, TOKEN, PAYER, 700) as spent:
            during = flights.taken(NET, TOKEN, PAYER)
            spent.unknown = False
        after = flights.balance_mark(NET, TOKEN)[0] - before
        async with flights.spending(NET, TOKEN, PAYER, 300):  # its outcome never known
            pass
        return during, after, flights.taken(NET, TOKEN, PAYER)

    assert asyncio.run(run()) == (700, 700, 300)
