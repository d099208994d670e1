"""The background resolver of ``pending`` payments (``keep_resolving``) as every process runs it: beside
the same task in other workers and replicas (one event per change, the chain's answer written once),
through a database or a chain that is away (the task goes on, at its pace, and catches up), and past
a row whose resolution raises (the rows after it are still followed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.ops.webhooks import Endpoint
from gateway.ops.webhooks.config import subscriptions_of
from settlement.errors import ChainUnavailable, LedgerError
from settlement.ledger import Ledger, Payment, PaymentState, outbox
from settlement.ledger.resolve import Resolution, keep_resolving
from settlement.schema import open_ledger
from tests.support.settlement_helpers import ledger_fields

TX = "0x" + "cd" * 32
EVERY = 0.02


def _pending_rows(ledger: Ledger, count: int) -> list[int]:
    ids = []
    for i in range(1, count + 1):
        row = ledger.record_verified(**ledger_fields(i, tx_hash=None))
        ledger.begin_settlement(row.id, (200, [], b"{}"), tx_hash=f"0x{i:064x}")
        ledger.mark_pending(row.id)
        ids.append(row.id)
    return ids


class Chain:
    """What the chain says of each row: even ids settled, odd ones failed; ``away`` raises."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause, self.away, self.reads = pause, False, 0

    async def resolve(self, row: Payment) -> Resolution:
        self.reads += 1
        await asyncio.sleep(self.pause)  # an RPC round trip: the other workers' rounds run meanwhile
        if self.away:
            raise ChainUnavailable("the node is away")
        after = PaymentState.SETTLED if row.id % 2 == 0 else PaymentState.FAILED
        return Resolution(row.id, row.request_id, row.state, after.value, row.tx_hash, 9, "chain")


async def _run_for(seconds: float, *tasks: Any) -> None:
    running = [asyncio.ensure_future(task) for task in tasks]
    await asyncio.sleep(seconds)
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()  # never ended on its own


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


def test_workers_and_replicas_resolving_the_same_rows_at_once_emit_one_event_per_change(postgres_database: str) -> None:
    """Three processes' tasks (three ledgers on one PostgreSQL database), each on every row: each row
    resolved once as the chain says, one ``payment.settled``/``payment.failed`` each, none twice."""
    ledgers = [open_ledger(postgres_database) for _ in range(3)]
    try:
        with ledgers[0].engine.begin() as connection:
            for table in ("webhook_outbox", "stored_responses", "payments"):
                connection.execute(text(f"DELETE FROM {table}"))
        hook = Endpoint("erp", "acme", "http://127.0.0.1:9/hook", frozenset({"payment.settled", "payment.failed"}), b"s")
        for ledger in ledgers:
            ledger.subscriptions = subscriptions_of({"erp": hook})
        ids = _pending_rows(ledgers[0], 12)
        chains = [Chain(pause=0.001 * i) for i in range(3)]
        asyncio.run(_run_for(0.6, *(keep_resolving(ledger, chain, EVERY) for ledger, chain in zip(ledgers, chains))))
        states = {row.id: row.state for row in ledgers[0].all()}
        assert states == {i: PaymentState.SETTLED if i % 2 == 0 else PaymentState.FAILED for i in ids}
        with ledgers[0].outbox_transaction() as connection:
            events = [(r["event_type"], json.loads(r["payload"])["data"]["paymentId"]) for r in outbox.list_rows(connection)]
        assert sorted(events) == sorted((f"payment.{'settled' if i % 2 == 0 else 'failed'}", i) for i in ids), events
    finally:
        for ledger in ledgers:
            ledger.close()


def test_a_database_or_chain_away_neither_ends_the_task_nor_makes_it_spin(sqlite_ledger: Ledger) -> None:
    [payment_id] = _pending_rows(sqlite_ledger, 1)
    chain, real, reads = Chain(), sqlite_ledger.open_payments, [0]

    def open_payments() -> list[Payment]:
        reads[0] += 1
        if reads[0] <= 5:
            raise LedgerError("ledger write failed (OperationalError)")  # the database is away
        return real()

    sqlite_ledger.open_payments = open_payments  # type: ignore[method-assign]

    async def scenario() -> None:
        chain.away = True
        task = asyncio.ensure_future(keep_resolving(sqlite_ledger, chain, EVERY))
        await asyncio.sleep(0.4)
        assert sqlite_ledger.get(payment_id).state == PaymentState.PENDING  # type: ignore[union-attr]
        assert chain.reads >= 1  # the database came back; the chain is still away: nothing written
        chain.away = False
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()

    asyncio.run(scenario())
    assert 6 <= reads[0] <= 0.6 / EVERY + 2  # one read a round: no tight loop while either was away
    assert sqlite_ledger.get(payment_id).state == PaymentState.FAILED  # type: ignore[union-attr]


class Poisoned(Chain):
    """One row whose resolution raises something else than ``ChainUnavailable`` (a malformed answer
    from the node, a row this version cannot read)."""

    def __init__(self, poisoned: int) -> None:
        super().__init__()
        self.poisoned = poisoned

    async def resolve(self, row: Payment) -> Resolution:
        if row.id == self.poisoned:
            raise KeyError("transactionHash")
        return await super().resolve(row)


def test_a_row_whose_resolution_raises_does_not_stop_the_rows_after_it(sqlite_ledger: Ledger) -> None:
    """The round used to end at that row, every round: every pending row after it was never followed
    again (no webhook, the ledger behind the chain) while the task looked alive."""
    first, second, third = _pending_rows(sqlite_ledger, 3)
    asyncio.run(_run_for(0.3, keep_resolving(sqlite_ledger, Poisoned(first), EVERY)))
    states = {row.id: row.state for row in sqlite_ledger.all()}
    assert states == {first: PaymentState.PENDING, second: PaymentState.SETTLED, third: PaymentState.FAILED}


def test_a_process_whose_turn_it_is_not_reads_nothing_and_the_one_whose_turn_it_is_resolves(sqlite_ledger: Ledger) -> None:
    """Workers and replicas take turns (``gateway.store.taking_turns``): the one without the turn
    does not read the chain for the open rows, round after round; the one with it resolves them."""
    [payment_id] = _pending_rows(sqlite_ledger, 1)
    idle, busy = Chain(), Chain()
    asked = {"idle": 0, "busy": 0}
    rounds = asyncio.Event()

    def turn(name: str, mine: bool) -> Any:
        async def my_turn() -> bool:
            asked[name] += 1
            if min(asked.values()) >= 3:
                rounds.set()
            return mine
        return my_turn

    async def scenario() -> None:
        tasks = [asyncio.ensure_future(keep_resolving(sqlite_ledger, idle, EVERY, turn("idle", False))),
                 asyncio.ensure_future(keep_resolving(sqlite_ledger, busy, EVERY, turn("busy", True)))]
        await asyncio.wait_for(rounds.wait(), 30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert idle.reads == 0 and busy.reads >= 1
    assert sqlite_ledger.get(payment_id).state == PaymentState.FAILED  # type: ignore[union-attr]
