"""``HeadClock``: the chain's clock where it is ahead of ours, read without a round trip per call."""

from __future__ import annotations

import asyncio

from settlement.chain.head_clock import HEAD_REFRESH_SECONDS, HEAD_STALE_SECONDS, HeadClock
from settlement.errors import ChainUnavailable


class Clocks:
    """Our wall and monotonic clocks, moved by hand; and a chain whose head is dated ``head``."""

    def __init__(self, wall: float, head: int) -> None:
        self.wall, self.mono, self.head = wall, 1000.0, head
        self.reads = 0
        self.down = False

    async def block_timestamp(self, number: int | None = None) -> int:
        self.reads += 1
        if self.down:
            raise ChainUnavailable("no answer")
        return self.head

    def clock(self) -> HeadClock:
        return HeadClock(self, wall=lambda: self.wall, monotonic=lambda: self.mono)


def test_a_chain_ahead_of_us_is_known_after_one_read_and_carried_forward() -> None:
    clocks = Clocks(wall=1_000_000.0, head=1_000_060)

    async def scenario() -> None:
        head = clocks.clock()
        assert await head.read_ahead() == 60 and clocks.reads == 1
        clocks.wall += 1.0
        clocks.mono += 1.0
        assert head.ahead() == 60 and head.now() == 1_000_061 and clocks.reads == 1  # no read: fresh enough

    asyncio.run(scenario())


def test_a_chain_behind_us_changes_nothing() -> None:
    clocks = Clocks(wall=1_000_000.0, head=999_990)

    async def scenario() -> None:
        head = clocks.clock()
        assert await head.read_ahead() == 0 and head.now() == 1_000_000

    asyncio.run(scenario())


def test_the_head_is_read_again_in_the_background_and_waited_for_only_when_stale() -> None:
    clocks = Clocks(wall=1_000_000.0, head=1_000_030)

    async def scenario() -> None:
        head = clocks.clock()
        await head.read_ahead()
        clocks.head = 1_000_090  # the chain's clock jumped
        clocks.mono += HEAD_REFRESH_SECONDS
        assert head.ahead() == 30 + int(HEAD_REFRESH_SECONDS)  # the old read, carried forward; a new one started
        await asyncio.sleep(0)  # the background read's turn (one loop step, no wall time)
        assert clocks.reads == 2 and head.ahead() == 90
        clocks.mono += HEAD_STALE_SECONDS
        clocks.wall += HEAD_STALE_SECONDS
        clocks.head = 1_000_000 + int(HEAD_STALE_SECONDS) + 120
        assert await head.read_ahead() == 120 and clocks.reads == 3  # stale: waited for

    asyncio.run(scenario())


def test_a_node_that_does_not_answer_leaves_our_clock() -> None:
    clocks = Clocks(wall=1_000_000.0, head=0)
    clocks.down = True

    async def scenario() -> None:
        head = clocks.clock()
        assert await head.read_ahead() == 0 and head.now() == 1_000_000

    asyncio.run(scenario())


def test_without_a_running_loop_it_is_our_clock() -> None:
    head = Clocks(wall=1_000_000.0, head=2_000_000).clock()
    assert head.ahead() == 0 and head.now() == 1_000_000
