"""Group commit: the SQLite ledger's one writer thread.

SQLite takes one writer at a time and its lock waits sleep in whole milliseconds, so the ledger
gives it one thread that runs the calls queued together in one transaction and commits once.
``Ledger`` (``settlement.ledger.payments``) owns the worker; this module knows only an engine and
the thread-local slot through which a call finds the group's connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from settlement.errors import LedgerError

__all__ = ["GroupCommitWorker", "atomic_alone"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
# Whom a call's outcome goes to: an executor's future (any thread), or an event loop's own future,
# answered on its loop (``submit_grouped_on``).
_Target = Future[Any] | asyncio.Future[Any]
# What the ledger thread takes from its queue: a call to run alone (``submit``), the calls one loop
# iteration made (``submit_grouped_on``), or None (shut down).
_Item = tuple[Callable[[], Any], _Target] | list[tuple[Callable[[], Any], _Target]] | None


def atomic_alone(fn: _F) -> _F:
    """Marks a ledger call that needs no savepoint of its own in a group transaction: it writes at
    most one statement (SQLite undoes a failing statement by itself), or its ORM part takes its own
    savepoint (``_session``). Every other call gets a savepoint."""
    fn.atomic_alone = True  # type: ignore[attr-defined]
    return fn


def _alone(call: Callable[[], Any]) -> bool:
    """Run without a savepoint: marked ``atomic_alone``, and not a ledger's transition that also
    writes its webhook event (two statements: the event and the change stand or fall together)."""
    func = getattr(call, "func", None)
    owner = getattr(func, "__self__", None)
    return bool(getattr(func, "atomic_alone", False)) and getattr(owner, "subscriptions", None) is None


class GroupCommitWorker(Executor):
    """The SQLite ledger's one thread. Calls queued while a transaction runs are run together in the
    next one, committed once, and only then answered: a caller that was told "written" is durable
    (the write-ahead rule), and a burst of payments costs one commit, not one each.

    ``submit_grouped_on`` is the event loop's way in (``Ledger.run``): its caller awaits a plain
    future of its loop, and a group's answers reach each loop in one ``call_soon_threadsafe`` (one
    wake-up of the loop per group, not one per call through a ``concurrent.futures.Future``). The
    calls a loop's tasks make in one iteration of the loop are handed over together at its end:
    one wake-up of this thread, and one transaction, for what would otherwise each have woken it
    and most often run alone (the thread is idle between iterations under a paid load).

    Each call runs in its own savepoint: one that raises is answered with its error, leaves nothing
    behind, and undoes none of the others.
    ``submit`` runs a call alone, outside any group transaction (the audit trail's appends, which
    take the database's write lock with a connection of their own).
    """

    MAX_GROUP = 256

    def __init__(self, engine: Engine, batch: threading.local) -> None:
        """``batch.connection`` is set to the group's connection while its calls run (and read by
        the ledger's ``_connection`` and ``_session``)."""
        self._engine = engine
        self._batch = batch
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._closed = False
        # Per loop, the calls of its current iteration not handed over yet. The lock orders them with
        # ``shutdown`` (any thread): each call is queued before the stop marker, or refused.
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[], Any], _Target]]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="x402gw-ledger", daemon=True)
        self._thread.start()

    def submit_grouped_on(self, call: Callable[[], _T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[_T]:
        """``call`` in a group transaction after this iteration of ``loop`` (its thread only): answered
        on ``loop`` after the commit. A caller that cancels its future stops waiting; the call, once
        made, runs all the same."""
        future: asyncio.Future[_T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise _closed()
            waiting = self._waiting.get(loop)
            if waiting is None:
                loop.call_soon(self._hand_over, loop)  # after the callbacks of this iteration (first: it may raise)
                waiting = self._waiting[loop] = []
            waiting.append((call, future))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            waiting = self._waiting.pop(loop, None)
            if waiting:  # else ``shutdown`` handed them over
                self._queue.put(waiting)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._closed:
                raise _closed()
            self._queue.put((functools.partial(fn, *args, **kwargs), future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops after the calls made so far, from any thread: those of every loop not handed over
        yet are handed over first (written, as they would have been at once), later ones refused."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for waiting in self._waiting.values():
                    self._queue.put(waiting)
                self._waiting.clear()
                self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        held: _Item = None
        while True:
            item = held if held is not None else self._queue.get()
            held = None
            if item is None:
                self._refuse_the_rest()
                return
            if isinstance(item, tuple):
                self._answer([(item[1], *_outcome(item[0]))])
                continue
            group = item
            while len(group) < self.MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, list):
                    held = nxt
                    if nxt is None:
                        self._queue.put(None)
                    break
                group.extend(nxt)
            for start in range(0, len(group), self.MAX_GROUP):  # one iteration's calls may be more
                self._answer(self._run_group(group[start:start + self.MAX_GROUP]))

    def _run_group(self, group: list[tuple[Callable[[], Any], _Target]]) -> list[tuple[_Target, bool, Any]]:
        if len(group) == 1:
            return [(group[0][1], *_outcome(group[0][0]))]
        outcomes: list[tuple[_Target, bool, Any]] = []
        try:
            with self._engine.begin() as connection:
                # pysqlite begins lazily at the first write: begin now, so the savepoints below nest
                # in this one transaction (and the write lock is held from a fresh snapshot).
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                self._batch.connection = connection
                try:
                    # Savepoints on the driver's cursor: SQLAlchemy's nested transactions cost more
                    # than the calls' own statements (settlement.ledger.statements).
                    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
                    for call, future in group:
                        if _alone(call):
                            outcomes.append((future, *_outcome(call)))
                            continue
                        cursor.execute("SAVEPOINT x402gw_call")
                        ok, value = _outcome(call)
                        if not ok:
                            cursor.execute("ROLLBACK TO SAVEPOINT x402gw_call")  # a failed call leaves nothing behind
                        cursor.execute("RELEASE SAVEPOINT x402gw_call")
                        outcomes.append((future, ok, value))
                finally:
                    self._batch.connection = None
        except Exception as exc:  # noqa: BLE001 - the commit (or BEGIN) failed: nothing of the group was written
            return [(future, False, _write_failed(exc)) for _, future in group]  # one error each: tracebacks apart
        return outcomes

    def _refuse_the_rest(self) -> None:
        """Calls that raced ``shutdown`` past its stop marker are answered, not left waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                GroupCommitWorker._answer([(future, False, _closed()) for _, future in (item if isinstance(item, list) else [item])])

    @staticmethod
    def _answer(outcomes: list[tuple[_Target, bool, Any]]) -> None:
        on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for future, ok, value in outcomes:
            if not isinstance(future, Future):
                on_loops.setdefault(future.get_loop(), []).append((future, ok, value))
            elif not future.set_running_or_notify_cancel():
                continue
            elif ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for loop, answers in on_loops.items():
            try:
                loop.call_soon_threadsafe(_settle, answers)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting (asyncio.wrap_future drops it too)


def _closed() -> LedgerError:
    return LedgerError("the ledger is closed", code="ledger_closed")


def _write_failed(exc: Exception) -> LedgerError:
    error = LedgerError(f"ledger write failed ({type(exc).__name__})")
    error.__cause__ = exc
    return error


def _settle(answers: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """On the futures' loop: each answer as ``asyncio.wrap_future`` would copy it over."""
    for future, ok, value in answers:
        if future.cancelled():
            continue  # its caller stopped waiting
        try:
            if ok:
                future.set_result(value)
            else:
                convert = _EXCEPTIONS.get(type(value))
                future.set_exception(value if convert is None else convert(*value.args))
        except Exception as exc:  # noqa: BLE001 - one future that cannot take its answer (StopIteration) leaves the others'
            future.get_loop().call_exception_handler({"message": "a ledger call's answer was refused", "exception": exc,
                                                      "future": future})
            refused = RuntimeError(f"the ledger call's answer could not be handed over ({type(value).__name__})")
            refused.__cause__ = exc
            future.set_exception(refused)  # never left waiting


# concurrent.futures' own exceptions as asyncio's (what ``asyncio.wrap_future`` converts).
_EXCEPTIONS: dict[type[BaseException], type[BaseException]] = {
    concurrent.futures.CancelledError: asyncio.CancelledError,
    concurrent.futures.InvalidStateError: asyncio.InvalidStateError,
}


def _outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, call()
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, like an executor would
        return False, exc
