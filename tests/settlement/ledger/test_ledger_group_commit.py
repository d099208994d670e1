"""The ledger off the event loop: on SQLite, calls queued together share one transaction and one
commit, each caller is answered only once its write is durable, and one call's error stays its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from settlement.errors import LedgerError
from settlement.ledger import Ledger, PaymentState
from settlement.ledger.models import LEDGER_THREADS
from settlement.schema import open_ledger
from tests.support.settlement_helpers import ledger_fields


def count_commits(ledger: Ledger) -> list[int]:
    commits: list[int] = []
    event.listen(ledger.engine, "commit", lambda _conn: commits.append(1))
    return commits


def test_concurrent_writes_share_commits_and_are_durable_when_answered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = open_ledger(url)
    commits = count_commits(ledger)
    outside = create_engine(url)  # another connection: sees only what was committed

    async def run() -> list[int]:
        rows = await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(i)) for i in range(60)))
        with outside.connect() as connection:  # answered means committed
            assert connection.execute(text("select count(*) from payments")).scalar() == 60
        await asyncio.gather(*(
            ledger.run(ledger.begin_settlement, row.id, (200, [("content-type", "text/plain")], b"ok"), tx_hash="0x" + "a" * 64)
            for row in rows
        ))
        with outside.connect() as connection:
            states = connection.execute(text("select state, tx_hash from payments")).all()
            assert {s for s, _ in states} == {PaymentState.SETTLING.value}
            assert {h for _, h in states} == {"0x" + "a" * 64}
            assert connection.execute(text("select count(*) from stored_responses")).scalar() == 60
        return [row.id for row in rows]

    try:
        ids = asyncio.run(run())
        assert len(set(ids)) == 60
        assert 0 < len(commits) < 60  # two rounds of 60 writes: grouped, far fewer commits than calls
    finally:
        outside.dispose()
        ledger.close()


def test_an_error_stays_with_its_call(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    async def run() -> list[Any]:
        first = await ledger.run(ledger.record_verified, **ledger_fields(1))
        duplicate_nonce = ledger_fields(2, nonce=first.nonce)
        return await asyncio.gather(
            ledger.run(ledger.mark_pending, first.id, error_reason="settlement_pending"),
            ledger.run(ledger.mark_pending, 999_999, error_reason="settlement_pending"),  # no such row
            ledger.run(ledger.record_verified, **duplicate_nonce),  # conflicts: answers the existing row
            ledger.run(ledger.record_verified, **ledger_fields(3)),
            return_exceptions=True,
        )

    try:
        updated, missing, existing, fresh = asyncio.run(run())
        assert updated is None
        assert isinstance(missing, LedgerError) and missing.code == "ledger_row_missing"
        assert existing.request_id == "req-1"  # the same authorization's row, not a second one
        assert fresh.request_id == "req-3"
        rows = {row.request_id: row for row in ledger.all()}
        assert set(rows) == {"req-1", "req-3"}
        assert rows["req-1"].error_reason == "settlement_pending"  # its neighbours' errors undid nothing
    finally:
        ledger.close()


def test_a_failed_commit_fails_every_call_in_it(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    def refuse(_conn: Any) -> None:
        raise RuntimeError("disk full")

    async def run() -> list[Any]:
        rows = await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(i)) for i in range(2)))
        event.listen(ledger.engine, "commit", refuse)
        try:
            return await asyncio.gather(
                *(ledger.run(ledger.fail, row.id, "settlement_unavailable") for row in rows for _ in range(5)),
                return_exceptions=True,
            )
        finally:
            event.remove(ledger.engine, "commit", refuse)

    try:
        results = asyncio.run(run())
        assert results and all(isinstance(r, (LedgerError, RuntimeError)) for r in results)
        grouped = [r for r in results if isinstance(r, LedgerError)]
        assert len({id(r) for r in grouped}) == len(grouped)  # one error each: their tracebacks stay apart
        assert {row.state for row in ledger.all()} == {PaymentState.VERIFIED.value}  # nothing half-written
    finally:
        ledger.close()


def test_postgresql_takes_concurrent_calls_on_a_pool(postgres_url: str) -> None:
    ledger = open_ledger(postgres_url)

    async def run() -> list[Any]:
        rows = await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(10_000 + i)) for i in range(40)))
        await asyncio.gather(*(ledger.run(ledger.begin_settlement, row.id, None) for row in rows))
        await asyncio.gather(*(ledger.run(ledger.mark_settled, row.id) for row in rows))
        return [await ledger.run(ledger.get, row.id) for row in rows]

    try:
        rows = asyncio.run(run())
        assert [row.state for row in rows] == [PaymentState.SETTLED.value] * 40
    finally:
        ledger.close()


def test_postgresql_keeps_its_connections_under_load(postgres_url: str) -> None:
    """Every ledger thread busy at once opens each connection once: none is opened per call and
    closed on return (SQLAlchemy's default pool of 5 did that to three of the eight threads, a
    PostgreSQL server process forked per write)."""
    ledger = open_ledger(postgres_url)
    connects: list[int] = []
    event.listen(ledger.engine, "connect", lambda *_: connects.append(1))

    async def run() -> None:
        rows = await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(20_000 + i)) for i in range(200)))
        for _ in range(3):
            await asyncio.gather(*(ledger.run(ledger.by_authorization, row.network, row.asset, row.payer, row.nonce)
                                   for row in rows))

    try:
        asyncio.run(run())
        assert 0 < len(connects) <= LEDGER_THREADS  # one per thread at most, never one per call
    finally:
        ledger.close()


def test_a_closed_ledger_refuses_new_calls(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.close()
    with pytest.raises(LedgerError) as refused:
        asyncio.run(ledger.run(ledger.all))
    assert refused.value.code == "ledger_closed"


def test_a_caller_that_stops_waiting_leaves_its_call_written_and_its_neighbours_answered(tmp_path: Path) -> None:
    """The loop's futures are answered a group at a time (``submit_grouped_on``): a cancelled caller's
    call still runs (as through ``asyncio.wrap_future``), and the others in its group get their answers."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    async def run() -> list[Any]:
        calls = [asyncio.ensure_future(ledger.run(ledger.record_verified, **ledger_fields(i))) for i in range(6)]
        await asyncio.sleep(0)  # all queued
        calls[2].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(run())
        assert isinstance(results[2], asyncio.CancelledError)
        assert [r.request_id for i, r in enumerate(results) if i != 2] == ["req-0", "req-1", "req-3", "req-4", "req-5"]
        assert len(ledger.all()) == 6
    finally:
        ledger.close()


def test_answers_reach_each_callers_own_loop_with_asyncios_exceptions(tmp_path: Path) -> None:
    """Two event loops (threads) share the one ledger thread; an executor's CancelledError raised by a
    call reaches its caller as asyncio's, as ``asyncio.wrap_future`` converted it."""
    import concurrent.futures
    import threading

    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    def cancelled() -> None:
        raise concurrent.futures.CancelledError("gone")

    async def run(base: int) -> list[Any]:
        rows = asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(base + i)) for i in range(20)))
        try:
            await ledger.run(cancelled)
        except asyncio.CancelledError as exc:
            return [*await rows, exc]
        raise AssertionError("not raised")

    results: dict[int, list[Any]] = {}
    threads = [threading.Thread(target=lambda b=base: results.__setitem__(b, asyncio.run(run(b)))) for base in (0, 100)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for base in (0, 100):
            *rows, error = results[base]
            assert [row.request_id for row in rows] == [f"req-{base + i}" for i in range(20)]
            assert type(error) is asyncio.CancelledError and error.args == ("gone",)
    finally:
        ledger.close()


def test_a_call_whose_answer_cannot_be_handed_over_is_still_answered(tmp_path: Path) -> None:
    """A ledger call that raises StopIteration (which a future refuses to carry) fails its caller with
    a RuntimeError naming it, instead of leaving it waiting for ever; its neighbours are answered."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    def stops() -> None:
        raise StopIteration

    async def run() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(
            ledger.run(stops), ledger.run(ledger.record_verified, **ledger_fields(1)), return_exceptions=True,
        ), timeout=30)

    try:
        refused, row = asyncio.run(run())
        assert isinstance(refused, RuntimeError) and "StopIteration" in str(refused)
        assert row.request_id == "req-1"
    finally:
        ledger.close()


class _CountingQueue:
    """The worker's queue, counting what the loop hands the ledger thread."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.puts: list[Any] = []

    def put(self, item: Any) -> None:
        self.puts.append(item)
        self.inner.put(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_calls_of_one_loop_iteration_are_handed_over_and_committed_together(tmp_path: Path) -> None:
    """Calls made before the loop polls again reach the ledger thread as one hand-over and share one
    transaction: one wake-up and one commit, not one each (they used to be queued one by one and
    mostly ran alone, the thread being idle between them)."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    worker = ledger.executor
    counting = worker._queue = _CountingQueue(worker._queue)  # type: ignore[union-attr]
    commits = count_commits(ledger)

    async def run() -> tuple[list[Any], list[Any]]:
        first = await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(i)) for i in range(12)))
        hand_overs, commits_then = len(counting.puts), len(commits)
        assert (hand_overs, commits_then) == (1, 1)
        assert [len(item) for item in counting.puts] == [12]
        second = await asyncio.gather(*(ledger.run(ledger.get, row.id) for row in first))
        return first, second

    try:
        first, second = asyncio.run(run())
        assert [row.request_id for row in first] == [f"req-{i}" for i in range(12)]
        assert [row.request_id for row in second] == [f"req-{i}" for i in range(12)]
        assert len(counting.puts) == 2  # the reads: their own iteration, one hand-over
    finally:
        ledger.close()


@pytest.mark.parametrize("closer", ["its-loop", "another-thread"])
def test_a_ledger_closed_before_a_loop_handed_its_calls_over_writes_them_first(tmp_path: Path, closer: str) -> None:
    """A loop has made calls that wait for the end of its iteration when the ledger is closed, by that
    loop or by another thread (the loop blocked meanwhile): ``shutdown`` hands them over before it
    stops, so they are written and answered as if handed over at once (never left waiting), and a
    call made after it is refused."""
    import threading

    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = open_ledger(url)
    made = threading.Event()
    thread = threading.Thread(target=lambda: made.wait(30) and ledger.close())

    async def run() -> list[Any]:
        calls = [asyncio.ensure_future(ledger.run(ledger.record_verified, **ledger_fields(i))) for i in range(3)]
        await asyncio.sleep(0)  # made, waiting for the end of the iteration...
        if closer == "its-loop":
            ledger.close()
        else:
            made.set()
            thread.join(30)  # ...while another thread closes the ledger
        with pytest.raises(LedgerError) as late:
            await ledger.run(ledger.record_verified, **ledger_fields(9))
        assert late.value.code == "ledger_closed"
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=30)

    thread.start()
    rows = asyncio.run(run())
    made.set()
    thread.join(30)
    assert [row.request_id for row in rows] == ["req-0", "req-1", "req-2"]
    reopened = open_ledger(url)
    try:
        assert sorted(row.request_id for row in reopened.all()) == ["req-0", "req-1", "req-2"]
    finally:
        reopened.close()


def test_one_iterations_calls_past_the_group_limit_are_committed_in_groups_of_it(tmp_path: Path) -> None:
    """A burst of more calls in one iteration than ``MAX_GROUP``: as many transactions as it takes,
    none larger (a larger one would hold the write lock, and every caller's answer, for longer)."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    worker = ledger.executor
    worker.MAX_GROUP = 5  # type: ignore[union-attr]
    commits = count_commits(ledger)

    async def run() -> list[Any]:
        return await asyncio.gather(*(ledger.run(ledger.record_verified, **ledger_fields(i)) for i in range(12)))

    try:
        rows = asyncio.run(run())
        assert [row.request_id for row in rows] == [f"req-{i}" for i in range(12)]
        assert len(commits) == 3  # 5 + 5 + 2
    finally:
        ledger.close()
