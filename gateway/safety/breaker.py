"""Circuit breaker per upstream, its state in the shared store so every replica sees it.

    closed ──N failures in window──▶ open ──cool-down over──▶ half-open ──probe ok──▶ closed
                                      ▲                            │
                                      └────────probe failed────────┘

Failures are what says the upstream is down: a 5xx answer, a timeout, a connection error (never
a 4xx: that is the caller's fault). They are counted in an epoch-aligned window with the store's
atomic budget counter. While open, requests for the upstream's tools get 503 ``upstream_circuit_open``
with ``Retry-After`` *before* any 402, so nobody pays for a dead upstream. In half-open, unpaid
requests get their 402; one paid request at a time holds the probe lock and calls the upstream (it
takes the lock after its payment is verified: a junk or unfunded payment never holds it).

Keys: ``breaker:<owner>/<upstream>:open`` (the open-until time, lingers as the half-open marker),
``:probe`` (lock) and ``:failures`` (counter).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from catalog import Tool
from catalog.limits import Breaker
from gateway import codes
from gateway.errors import GatewayError
from gateway.store import StateStore, StoreUnavailable

__all__ = ["UNREAD", "Breakers", "Ticket", "Unread", "upstream_key"]

log = logging.getLogger("x402gw.breaker")

HALF_OPEN_LINGER_SECONDS = 3600  # a half-open breaker nobody probes closes on its own after this
PROBE_TTL_MS = 120_000  # the probe lock lapses if its holder dies
MAX_BACK_OFF_SECONDS = 3600.0  # the longest Retry-After a 429 opens the breaker for


def upstream_key(tool: Tool) -> str:
    return f"{tool.owner}/{tool.upstream.name}"


@dataclass(frozen=True)
class Ticket:
    """What the check let through: a probe must report back (success closes, failure re-opens)."""

    upstream: str
    probe_owner: str | None = None
    half_open: bool = False  # let through in half-open without the probe: a paid request takes it after verify


class Unread:
    """``check``'s default: the breaker's state is read from the store."""


UNREAD = Unread()


class Breakers:
    def __init__(
        self, store: StateStore, tools: Iterable[Tool], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.clock = clock
        self.configs: dict[str, Breaker] = {upstream_key(t): t.upstream.breaker for t in tools}
        # The state this process last saw of each breaker, for a synchronous dashboard.
        self._seen: dict[str, str] = {}
        self._until: dict[str, float] = {}
        # Upstreams this process counted a failure of since their last success: a success resets the
        # count, so a griefer's free failing calls (voided, never charged) must come in an unbroken run.
        self._failing: set[str] = set()
        # Told when this process opens a breaker (upstream key, open until): the webhooks' breaker.opened.
        self.on_open: Callable[[str, float], Awaitable[None]] | None = None

    def states(self) -> dict[str, str]:
        """``{upstream: closed|open|half_open}`` as this process last saw it (every request for an
        upstream reads its state); ``open_breakers()`` asks the store."""
        now = self.clock()
        return {
            name: ("half_open" if state == "open" and now >= self._until.get(name, 0) else state)
            for name, state in self._seen.items()
        }

    def _key(self, upstream: str, part: str) -> str:
        return f"breaker:{upstream}:{part}"

    def open_key(self, tool: Tool) -> str:
        """The store key of ``tool``'s breaker state (read with others: ``check(open_raw=...)``)."""
        return self._key(upstream_key(tool), "open")

    async def _open_until(self, upstream: str) -> float | None:
        return self._seen_open(upstream, await self.store.get(self._key(upstream, "open")))

    def _seen_open(self, upstream: str, raw: bytes | None) -> float | None:
        until = float(raw) if raw else None
        self._note(upstream, until)
        return until

    def _note(self, upstream: str, until: float | None) -> None:
        self._seen[upstream] = "closed" if until is None else "open"
        if until is not None:
            self._until[upstream] = until

    async def check(self, tool: Tool, probe_owner: str | None = None, *, open_raw: bytes | None | Unread = UNREAD) -> Ticket:
        """Raise 503 ``upstream_circuit_open`` while open. In half-open, let unpaid requests through
        (``probe_owner`` None) and one paid request at a time (it holds the probe lock).
        ``open_raw``: the value of ``open_key(tool)`` when the caller has just read it."""
        upstream = upstream_key(tool)
        until = await self._open_until(upstream) if isinstance(open_raw, Unread) else self._seen_open(upstream, open_raw)
        if until is None:
            return Ticket(upstream)
        now = self.clock()
        if now < until:
            raise self._refusal(upstream, until - now)
        if probe_owner is None:
            return Ticket(upstream, half_open=True)
        if await self.store.acquire(self._key(upstream, "probe"), probe_owner, PROBE_TTL_MS):
            return Ticket(upstream, probe_owner)
        raise self._refusal(upstream, 1)

    def _refusal(self, upstream: str, seconds: float) -> GatewayError:
        return GatewayError(
            codes.UPSTREAM_CIRCUIT_OPEN,
            "the upstream behind this tool is failing or asked callers to slow down; no payment is asked "
            "until it recovers; retry later",
            status=503, retryAfter=max(1, math.ceil(seconds)), upstream=upstream, retryable=True,
        )

    async def record(self, ticket: Ticket, ok: bool) -> None:
        """Report the outcome of an upstream call made under ``ticket``."""
        upstream = ticket.upstream
        config = self.configs.get(upstream, Breaker())
        if ticket.probe_owner is not None:
            if ok:
                await self.store.delete(self._key(upstream, "open"))
                await self._reset_failures(upstream, config)
                self._note(upstream, None)
            else:
                await self._open(upstream, config)
            await self.release(ticket)
            return
        if ok:
            if upstream in self._failing:  # a success between failures: they were not an outage
                self._failing.discard(upstream)
                await self._reset_failures(upstream, config)
            return
        self._failing.add(upstream)
        counted = await self.store.reserve_budget(
            self._key(upstream, "failures"), 1, config.failures - 1, config.window_seconds
        )
        if not counted.allowed:  # this failure is the N-th in the window
            await self._open(upstream, config)
            await self.store.release_budget(
                self._key(upstream, "failures"), config.failures, config.window_seconds, counted.resets_at
            )

    async def back_off(self, tool: Tool, seconds: float | None) -> None:
        """The upstream answered 429 (too many requests) with the owner's credentials: it serves
        nobody now. Opened for its ``Retry-After``, at least the breaker's cool-down (a griefer must
        not get one refund a second out of ``Retry-After: 1``) and at most ``MAX_BACK_OFF_SECONDS``,
        so calls are refused before any 402 rather than paid for and refunded, one refund's gas
        each. Not a failure: the failure count is left alone. Never shortens an opening already
        there; a store that is away leaves it closed (logged)."""
        upstream = upstream_key(tool)
        config = self.configs.get(upstream, Breaker())
        floor = min(float(config.cooldown_seconds), MAX_BACK_OFF_SECONDS)
        wait = floor if seconds is None else min(max(seconds, floor), MAX_BACK_OFF_SECONDS)
        try:
            current = await self._open_until(upstream)
            if current is not None and current >= self.clock() + wait:
                return
            until = await self._open_for(upstream, wait)
        except StoreUnavailable:
            log.warning("upstream %s answered 429; not backed off: the store is unavailable", upstream)
            return
        log.warning("upstream %s answered 429: no payment is asked for its tools until %s", upstream,
                    datetime.fromtimestamp(until, UTC).isoformat())

    async def release(self, ticket: Ticket) -> None:
        """Give the probe back without an outcome (the request stopped before the upstream)."""
        if ticket.probe_owner is not None:
            await self.store.release(self._key(ticket.upstream, "probe"), ticket.probe_owner)

    async def _open_for(self, upstream: str, seconds: float) -> float:
        """Open ``upstream``'s breaker for ``seconds`` (the key lingers after, as the half-open marker);
        the time it opens until."""
        until = self.clock() + seconds
        ttl_ms = math.ceil(seconds + HALF_OPEN_LINGER_SECONDS) * 1000
        await self.store.put(self._key(upstream, "open"), repr(until).encode(), ttl_ms)
        self._note(upstream, until)
        return until

    async def _open(self, upstream: str, config: Breaker) -> None:
        until = await self._open_for(upstream, config.cooldown_seconds)
        log.warning("circuit breaker for %s is open until %s", upstream, datetime.fromtimestamp(until, UTC).isoformat())
        if self.on_open is not None:
            await self.on_open(upstream, until)

    async def _reset_failures(self, upstream: str, config: Breaker) -> None:
        now = math.floor(self.clock())
        resets_at = now - now % config.window_seconds + config.window_seconds
        await self.store.release_budget(self._key(upstream, "failures"), 10**9, config.window_seconds, resets_at)

    async def open_breakers(self) -> list[dict[str, Any]]:
        """Every breaker not closed, for the dashboard: upstream, state, openUntil (ISO)."""
        result: list[dict[str, Any]] = []
        now = self.clock()
        for upstream in sorted(self.configs):
            until = await self._open_until(upstream)
            if until is None:
                continue
            result.append({
                "upstream": upstream,
                "state": "open" if now < until else "half_open",
                "openUntil": datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds"),
            })
        return result
