"""Resolutions of payments whose outcome is not final (``settling``, ``pending``), applied to the ledger.

Runs at gateway start-up, when a payment in such a state is presented again, in the background for
``pending`` rows (``keep_resolving``), and from ``x402gw reconcile``. What happened is the scheme's to say (for ``exact``, the chain:
``settlement.schemes.exact_resolve``); this module only defines the answer and writes it through
the ledger's named transitions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from settlement.errors import ChainUnavailable, LedgerError
from settlement.ledger import Ledger, Payment, PaymentState

log = logging.getLogger("x402gw.resolve")


@dataclass(frozen=True, slots=True)
class Resolution:
    payment_id: int
    request_id: str
    before: str
    after: str
    tx_hash: str | None
    block_number: int | None
    reason: str
    # The gas our own transaction paid when the row is settled by another's (a copy of ours, which
    # moved the payment while ours reverted): its hash is the copy's, the gas stays ours on the row.
    gas: dict[str, int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class Resolver(Protocol):
    """Who can say what happened to an open payment: the scheme registry
    (``settlement.schemes.Schemes``). None: it cannot tell (no chain access for that network)."""

    async def resolve(self, row: Payment) -> Resolution | None: ...


def apply(ledger: Ledger, resolution: Resolution) -> None:
    """Writes a resolution through the ledger's transitions (a resolved row is ``settling`` or
    ``pending``): ``mark_settled``, ``fail`` or ``mark_pending``."""
    fields: dict[str, Any] = {}
    if resolution.tx_hash:
        fields["tx_hash"] = resolution.tx_hash
    after = resolution.after
    if after == PaymentState.PENDING.value:
        ledger.mark_pending(resolution.payment_id, **fields)
        return
    if resolution.block_number is not None:
        fields["block_number"] = resolution.block_number
    if after == PaymentState.SETTLED.value:
        ledger.mark_settled(resolution.payment_id, gas=resolution.gas, **fields)
    elif after == PaymentState.FAILED.value:
        ledger.fail(resolution.payment_id, resolution.reason, **fields)
    else:
        raise ValueError(f"a reconcile does not resolve a payment to {after!r}")


def apply_unless_moved(ledger: Ledger, row: Payment, resolution: Resolution) -> bool:
    """``apply``, only if the row is still as ``row`` read it; False (nothing written) if it moved
    meanwhile. A resolution is of the row as it was read: a row failed without a transaction since
    (by another process) and reused by a fresh authorization under the same nonce (``record_verified``)
    is another payment, now ``settling`` with its own broadcast, and ``fail`` is allowed from there.
    Checked and written in one transaction holding the row (``Ledger.holding``): no other process's
    write lands between the check and the write."""
    with ledger.holding(row.id):
        current = ledger.get(row.id)
        if current is None or _version(current) != _version(row):
            return False
        apply(ledger, resolution)
        return True


def _version(row: Payment) -> tuple[Any, ...]:
    return row.state, row.request_id, row.tx_hash, row.authorization, row.updated_at


def changes(row: Payment, resolution: Resolution) -> bool:
    """Whether applying ``resolution`` would write anything."""
    return resolution.after != row.state or resolution.tx_hash != row.tx_hash


async def resolve_open_payments(
    ledger: Ledger, resolver: Resolver, *, which: Callable[[Payment], bool] = lambda row: True,
    orphaned: Callable[[Payment], Awaitable[bool]] | None = None, unreachable: list[Payment] | None = None,
) -> list[Resolution]:
    """Resolve every ``settling``/``pending`` row the resolver can tell about (of those ``which``
    keeps, and the ``settling`` ones ``orphaned`` says no live request holds); apply and report.

    A row the resolver cannot tell about, or whose chain does not answer (added to ``unreachable``),
    stays open (reported by reconcile as still open)."""
    results: list[Resolution] = []
    rows = await ledger.run(ledger.open_payments)
    for row in rows:
        if not which(row) and not (orphaned is not None and row.state == PaymentState.SETTLING and await orphaned(row)):
            continue
        try:
            resolution = await resolver.resolve(row)
        except ChainUnavailable:
            if unreachable is not None:
                unreachable.append(row)
            continue
        if resolution is None:
            continue
        if changes(row, resolution):
            # Another process (a worker, a replica, a resend) may have moved the row on meanwhile,
            # from what the chain said later, or reused it for another payment: its write stands,
            # this older view is dropped.
            try:
                if not await ledger.run(apply_unless_moved, ledger, row, resolution):
                    continue
            except LedgerError as exc:
                if exc.code != "invalid_transition":
                    raise
                continue
        results.append(resolution)
    return results


class _RowByRow:
    """A resolver whose failure on one row (anything but the chain away: a malformed answer, a row
    it cannot read) is logged and leaves that row open, not the round ended: otherwise every round
    would end at it and no row after it would ever be followed again."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def resolve(self, row: Payment) -> Resolution | None:
        try:
            return await self.resolver.resolve(row)
        except ChainUnavailable:
            raise
        except Exception:  # this row's alone; the next round tries it again
            log.exception("pending payment %d not resolved this round", row.id)
            return None


def _pending(row: Payment) -> bool:
    return row.state == PaymentState.PENDING


class Turn(Protocol):
    """Whether this process runs a round (workers and replicas take turns through the shared store),
    and its turn given up for others to take."""

    async def __call__(self) -> bool: ...

    async def give_up(self) -> None: ...


async def keep_resolving(ledger: Ledger, resolver: Resolver, every: float, my_turn: Turn | None = None,
                         then: Callable[[list[Resolution], bool], Awaitable[object]] | None = None,
                         orphaned: Callable[[Payment], Awaitable[bool]] | None = None) -> None:
    """Resolve the ``pending`` rows every ``every`` seconds until cancelled: a settlement broadcast
    whose receipt did not come before its request answered is followed to its outcome (settled,
    failed) as the chain gives it, without a resend. ``settling`` rows are left to their request,
    unless ``orphaned`` says none holds it (a replica killed and never restarted: its rows would
    otherwise wait for some process's start-up). A round that fails (the database or the chain
    away) is logged and the next one tries again. ``my_turn``: whether this process runs this round
    (workers and replicas take turns through the shared store: one reads the chain for every open
    row, not each of them; their writes would be safe anyway, ``apply_unless_moved``); a process
    whose round could not reach a chain gives its turn up, for one that can. ``then``: given each
    round's resolutions (none when not its turn) and whether it was its turn (the gateway owes the
    refunds of answers never given, and asks again about those a held lock kept back)."""
    isolated = _RowByRow(resolver)
    while True:
        await asyncio.sleep(every)
        try:
            resolved: list[Resolution] = []
            turn = my_turn is None or await my_turn()
            if turn:
                unreachable: list[Payment] = []
                resolved = await resolve_open_payments(ledger, isolated, which=_pending, orphaned=orphaned,
                                                       unreachable=unreachable)
                if unreachable and my_turn is not None:
                    log.warning("%d open payments: their chain does not answer; the turn is given up", len(unreachable))
                    await my_turn.give_up()
            for resolution in resolved:
                if resolution.after != resolution.before:
                    log.info("open payment resolved: %s", resolution.to_json())
            if then is not None:  # every round, its turn or not: what it asks again is this process's own
                await then(resolved, turn)
        except Exception:  # never ends the loop: the next round tries again
            log.exception("pending payments not resolved this round")
