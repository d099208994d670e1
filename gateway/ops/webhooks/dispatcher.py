"""The webhook dispatcher: a background task of the gateway process that delivers the outbox's due
rows (``settlement.ledger.outbox``), each under a lease, signed (``signing``), and records each
attempt: delivered on a 2xx, else retried after an exponential backoff (1 s, 2 s, 4 s ... at most
an hour; no jitter), and ``dead`` after ``max_attempts`` (still replayable).

Time comes from ``clock`` and the wait between attempts from ``backoff``, both injectable, so a
test drives retries with ``run_once`` and a clock it moves, never with sleeps. The loop (``run``)
calls ``run_once`` every ``poll_seconds`` or when woken.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.engine import RowMapping

from gateway.ops.webhooks.config import Endpoint
from gateway.ops.webhooks.signing import SIGNATURE_HEADER, signature_header
from settlement.ledger import Ledger, outbox, utcnow

__all__ = ["Dispatcher", "exponential_backoff"]

log = logging.getLogger("x402gw.webhooks")

Clock = Callable[[], datetime]
Backoff = Callable[[int], timedelta]
EVENT_ID_HEADER = "X402GW-Event-Id"
EVENT_TYPE_HEADER = "X402GW-Event-Type"


def exponential_backoff(attempts: int, base: float = 1.0, cap: float = 3600.0) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: base × 2^(attempts-1), at most ``cap``."""
    return timedelta(seconds=min(cap, base * 2 ** max(0, attempts - 1)))


class Dispatcher:
    def __init__(
        self, ledger: Ledger, endpoints: Mapping[str, Endpoint], *, client: httpx.AsyncClient | None = None,
        clock: Clock = utcnow, backoff: Backoff = exponential_backoff, lease: timedelta = timedelta(seconds=30),
        max_attempts: int = 12, poll_seconds: float = 1.0, batch: int = 50, timeout_seconds: float = 10.0,
    ) -> None:
        self.ledger = ledger
        self.endpoints = dict(endpoints)
        self.client = client or httpx.AsyncClient(timeout=timeout_seconds, follow_redirects=False)
        self.clock, self.backoff, self.lease = clock, backoff, lease
        self.max_attempts, self.poll_seconds, self.batch = max_attempts, poll_seconds, batch
        self.worker = f"{uuid.uuid4().hex[:16]}"  # this process's lease name
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the outbox, on the ledger's threads ---------------------------------------------------

    def _due(self, now: datetime) -> list[RowMapping]:
        with self.ledger.outbox_transaction() as connection:
            return outbox.due(connection, now, self.batch)

    def _claim(self, row_id: int, now: datetime) -> bool:
        with self.ledger.outbox_transaction() as connection:
            return outbox.claim(connection, row_id, self.worker, now, self.lease)

    def _finish(self, row_id: int, **fields: Any) -> bool:
        with self.ledger.outbox_transaction() as connection:
            return outbox.finish(connection, row_id, self.worker, **fields)

    # -- delivery ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Deliver every row due now (one attempt each); returns how many were delivered."""
        delivered = 0
        for row in await self.ledger.run(self._due, self.clock()):
            if not await self.ledger.run(self._claim, row["id"], self.clock()):
                continue  # another replica holds it
            ok, status, error = await self._attempt(row)
            attempts = row["attempts"] + 1
            retry_at = None if ok or attempts >= self.max_attempts else self.clock() + self.backoff(attempts)
            if not ok:
                when = retry_at.isoformat() if retry_at else "never (dead; replay it)"
                log.warning("webhook %s (%s) to %s: attempt %d failed (%s); next attempt %s",
                            row["event_id"], row["event_type"], row["endpoint"], attempts, error, when)
            await self.ledger.run(self._finish, row["id"], delivered=ok, now=self.clock(),
                                  next_attempt_at=retry_at, status_code=status, error=error)
            delivered += ok
        return delivered

    async def _attempt(self, row: RowMapping) -> tuple[bool, int | None, str | None]:
        endpoint = self.endpoints.get(row["endpoint"])
        if endpoint is None:
            return False, None, "endpoint_not_configured"
        body = row["payload"].encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: row["event_id"],
            EVENT_TYPE_HEADER: row["event_type"],
            SIGNATURE_HEADER: signature_header(endpoint.secret, int(self.clock().timestamp()), body),
            "User-Agent": "x402gw-webhooks/1",
        }
        try:
            response = await self.client.post(endpoint.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return False, None, "timeout"
        except httpx.HTTPError:
            return False, None, "connection_failed"
        if 200 <= response.status_code < 300:
            return True, response.status_code, None
        return False, response.status_code, f"http_{response.status_code}"

    # -- the background loop -------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("webhook dispatch round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="x402gw-webhooks")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.client.aclose()
