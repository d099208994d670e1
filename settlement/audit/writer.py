"""The audit trail's asyncio front: a bounded queue and one writer task that commits the events of
many requests per transaction, off the event loop. Records are never dropped silently: a full queue
spills into a list the writer empties next, and a write that keeps failing is logged record by record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

from settlement.audit.canonical import clean_fields, iso_utc
from settlement.audit.records import AuditEvent
from settlement.audit.trail import AuditTrail
from settlement.errors import LedgerError

__all__ = ["AuditSink", "AuditWriter", "DirectSink"]

log = logging.getLogger("x402gw.audit")


class AuditSink(Protocol):
    """Where the pipeline hands each finished request's events; must not block or raise."""

    def submit(self, events: Sequence[AuditEvent]) -> None: ...

    async def close(self) -> None: ...


class AuditWriter:
    """A bounded queue and one writer task: the events of many requests per transaction.

    ``submit`` never blocks the loop and never drops: when the queue is full, events wait in a
    spill list the writer empties after the queue, still many per transaction (one transaction per
    request would make a writer that fell behind fall further behind). ``drain`` (from another
    thread) and ``flush`` (on the loop) wait until everything submitted so far is written or, after
    retries, logged as lost.
    """

    def __init__(self, trail: AuditTrail, *, max_queued: int = 10_000, max_batch: int = 500,
                 retries: int = 3, executor: Executor | None = None, linger_seconds: float = 0.01) -> None:
        self.trail = trail
        # How long the writer waits for more requests' events before a transaction: a transaction's
        # own cost (head row, commit) is several records', so one per request would cost more than
        # the records at low concurrency. Records are chained a few milliseconds later; none is lost.
        self.linger_seconds = linger_seconds
        # Where appends run: the ledger's thread when both share one SQLite file (no lock waits
        # between the two writers), else the loop's default pool.
        self._executor = executor
        self.max_batch = max_batch
        self.retries = retries
        self.written = 0
        self.failed = 0
        self._max_queued = max_queued
        self._queue: asyncio.Queue[list[AuditEvent]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spill: list[AuditEvent] = []  # on the loop's thread only, like the queue
        self._pending = 0
        self._idle = threading.Condition()

    def submit(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        batch = list(events)
        with self._idle:
            self._pending += len(batch)
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue(self._max_queued)
            self._task = loop.create_task(self._run(self._queue), name="audit-writer")
        if self._spill or self._queue.full():  # behind the queue, in order
            self._spill.extend(batch)
        else:
            self._queue.put_nowait(batch)

    async def _run(self, queue: asyncio.Queue[list[AuditEvent]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = []
            if not self._spill:
                batch = await queue.get()
                if self.linger_seconds > 0 and len(batch) * (1 + queue.qsize()) < self.max_batch:  # not a full batch yet
                    await asyncio.sleep(self.linger_seconds)
            while len(batch) < self.max_batch and not queue.empty():
                batch.extend(queue.get_nowait())
            if len(batch) < self.max_batch and self._spill:
                room = self.max_batch - len(batch)
                batch.extend(self._spill[:room])
                del self._spill[:room]
            await loop.run_in_executor(self._executor, self._write, batch)

    def _write(self, batch: list[AuditEvent]) -> None:
        written = 0
        try:
            for attempt in range(self.retries + 1):
                try:
                    self.trail.append(batch)
                    written = len(batch)
                    return
                except LedgerError as exc:
                    if attempt == self.retries:
                        self._lost(batch, exc.message)
                        return
                    threading.Event().wait(0.05 * 2**attempt)  # back off before the next attempt
                except Exception:  # noqa: BLE001 - one event the trail cannot take (a bug, a value with no JSON form)
                    # Never the whole batch for it (up to max_batch other requests' records): each
                    # event alone, and only the ones that fail again are logged as lost.
                    written = self._write_each(batch)
                    return
        finally:
            with self._idle:
                self.written += written
                self.failed += len(batch) - written
                self._pending -= len(batch)
                self._idle.notify_all()

    def _write_each(self, batch: list[AuditEvent]) -> int:
        written = 0
        for item in batch:
            try:
                self.trail.append([item])
                written += 1
            except LedgerError as exc:
                self._lost([item], exc.message)
            except Exception as exc:  # noqa: BLE001 - logged below, never raised to the loop
                self._lost([item], type(exc).__name__, "an event the audit trail cannot take")
        return written

    @staticmethod
    def _lost(batch: list[AuditEvent], reason: str, what: str = "audit trail unavailable") -> None:
        log.error("%s (%s): %d records follow, not chained", what, reason, len(batch))
        for item in batch:
            try:
                text = json.dumps({
                    "at": iso_utc(item.at), "requestId": item.request_id, "event": item.event,
                    "payer": item.payer, "tool": item.tool, "data": clean_fields(item.fields),
                }, default=str, sort_keys=True)
            except Exception:  # noqa: BLE001 - the event that broke the trail may break this too
                text = f"request {item.request_id!r} event {item.event!r} (its fields have no JSON form)"
            log.error("audit record not chained: %s", text)

    def drain(self, timeout: float = 30.0) -> bool:
        """Block the calling thread (never the loop's) until all submitted records are handled."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    async def flush(self) -> None:
        if self._pending:
            await asyncio.to_thread(self.drain)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.trail.close()


class DirectSink:
    """Appends at once, in the caller's thread: for a command (``x402gw reconcile``) that writes a
    handful of records and has no writer task. A failed append is logged record by record, as the
    writer's are, never raised."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def submit(self, events: Sequence[AuditEvent]) -> None:
        try:
            self.trail.append(events)
        except Exception as exc:  # noqa: BLE001 - logged below; the command's own work goes on
            AuditWriter._lost(list(events), exc.message if isinstance(exc, LedgerError) else type(exc).__name__)

    async def close(self) -> None:
        self.trail.close()
