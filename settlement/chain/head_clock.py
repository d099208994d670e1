"""``HeadClock``: the chain's clock, the one a token judges an authorization's window by, read cheaply.

Our clock and the chain's can disagree (a gateway host whose clock is slow, a chain whose blocks are
dated ahead): a payment with time left by ours may be expired by the chain's already, and then the
upstream runs unpaid and its settlement reverts on our gas. The chain's clock is the date the node
gives its next (pending) block, carried forward by the time since it was read (where the node keeps
no pending block, the latest block's: a lower bound, the next block is dated at least that); a
chain idle for a while is thus not taken for a clock behind ours. ``now`` is the later of the two
clocks (``validBefore``), ``behind`` how far the chain's lags ours (``validAfter``). It is read again
in the background at most every ``HEAD_REFRESH_SECONDS`` while calls ask: a paid call waits for a
read only when none was made yet or the last is older than ``HEAD_STALE_SECONDS`` (``read_ahead``);
the start-up checks make the first one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from settlement.errors import ChainUnavailable

__all__ = ["HEAD_REFRESH_SECONDS", "HEAD_STALE_SECONDS", "HeadClock", "HeadReads"]

log = logging.getLogger("x402gw.chain")

HEAD_REFRESH_SECONDS = 2.0  # the head's timestamp is read again this often, at most, while calls ask
HEAD_STALE_SECONDS = 60.0  # older than this, a call waits for a fresh read instead of using it


class HeadReads(Protocol):
    async def block_timestamp(self, number: int | None = None) -> int: ...


class HeadClock:
    def __init__(self, chain: HeadReads, *, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._chain = chain
        self._wall, self._monotonic = wall, monotonic
        self._head: tuple[float, int] | None = None  # (our monotonic clock when read, the head's timestamp)
        self._reading: asyncio.Task[None] | None = None

    def now(self) -> int:
        """The chain's clock as far as it is known, in whole seconds (a block's timestamp is): never
        behind ours. A read in the background is started when the last one is old."""
        wall, chain = int(self._wall()), self._chain_now()
        return wall if chain is None else max(wall, chain)

    def behind(self) -> int:
        """Whole seconds the chain's clock is known to be behind ours (0 when it is not, or not known
        yet): the next block may be dated that far back, and a token takes an authorization only in a
        block dated after its ``validAfter``."""
        chain = self._chain_now()
        return 0 if chain is None else max(0, int(self._wall()) - chain)

    def _chain_now(self) -> int | None:
        """The last read's date carried forward by the time since (None before any read); a read in
        the background is started when it is ``HEAD_REFRESH_SECONDS`` old."""
        head = self._head
        if head is None or self._monotonic() - head[0] >= HEAD_REFRESH_SECONDS:
            self._refresh()
        if head is None:
            return None
        read_at, stamp = head
        return int(stamp + (self._monotonic() - read_at))

    def ahead(self) -> int:
        """Whole seconds the chain's clock is known to be ahead of ours (0 when it is not, or not known yet)."""
        return self.now() - int(self._wall())

    async def read_ahead(self) -> int:
        """``ahead``, after a read of the head when there was none yet or the last one is stale (a node
        that does not answer leaves our clock: verify's own reads then fail on their own)."""
        if self._head is None or self._monotonic() - self._head[0] >= HEAD_STALE_SECONDS:
            task = self._refresh()
            if task is not None:
                await asyncio.shield(task)
        return self.ahead()

    def _refresh(self) -> asyncio.Task[None] | None:
        if self._reading is None or self._reading.done():
            try:
                self._reading = asyncio.get_running_loop().create_task(self._read())
            except RuntimeError:  # no running loop (a synchronous caller): the next asynchronous one reads
                return None
        return self._reading

    async def _read(self) -> None:
        try:
            # The next block's date where the node can say (an idle chain's latest block is old, and
            # says nothing of its clock); the latest block's otherwise.
            pending = getattr(self._chain, "next_block_timestamp", None)
            stamp = await pending() if pending is not None else await self._chain.block_timestamp()
        except ChainUnavailable as exc:
            log.debug("head timestamp unread: %s", exc.message)
            return
        except Exception:  # a malformed answer: our clock stands in for it
            log.exception("head timestamp: unexpected answer from the node")
            return
        self._head = (self._monotonic(), stamp)  # answered by now: the chain's clock is at least ``stamp``
