"""The payment ledger: one row per payment, SQLAlchemy 2.0, SQLite by default, PostgreSQL by URL.

State machine of a row, and the only methods that move it (each one UPDATE guarded by the states
it may leave; a row in any other state is refused with ``LedgerError(code="invalid_transition")``
and left unchanged)::

    (insert) ──record_verified──▶ verified
    verified ──begin_settlement──▶ settling        (write-ahead, before any broadcast)
    verified ──void──────────────▶ voided          (upstream failed before settlement: nothing charged)
    settling ──mark_settled──────▶ settled
    settling ──fail──────────────▶ failed          (the chain said no; nothing moved)
    settling ──mark_pending──────▶ pending         (broadcast, outcome not final yet: reconcile)
    pending  ──mark_settled / fail / mark_pending  (reconcile against the chain)

    Also allowed, as the flows need them: ``begin_settlement`` settling→settling (a re-signed broadcast's new hash),
    ``fail`` and ``mark_pending`` from verified (refused or unknown before the write-ahead hook ran), ``mark_settled``
    settled→settled and ``fail`` failed→failed (a reconcile that got there first). ``record_verified`` reuses a voided
    row, or a failed one without a transaction hash, as a fresh ``verified`` row.

    No state change: ``record_tx_hash`` (settling), ``record_upstream_status``, ``record_refund_owed``
    (once: a second request finds it owed and pays nothing), ``record_refund_tx`` (a claim: one payer of
    the refund at a time), ``record_refund_paid`` (once) (settled), ``record_gas`` (settled or failed: a mined transaction's gas, read from its receipt).

With ``subscriptions`` set (webhooks configured), ``mark_settled``, ``fail``, ``mark_pending`` (each when the state
changed), ``record_refund_owed`` and ``record_refund_paid`` also write their event to the webhook outbox in the same
transaction (``settlement.ledger.outbox``): a crash loses neither.

``mark_settled`` and ``fail`` take the transaction's gas as well (``gas``: ``gas_used``,
``gas_price``, ``gas_cost``; see ``settlement.chain.gas``), written in the same UPDATE.

Amounts are Python ints in atomic units (``settlement.ledger.models``). The repository records,
never decides policy; calls are synchronous (the gateway runs them off the event loop); the schema
is migrated by ``settlement.schema.open_ledger``, not here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from settlement.errors import LedgerError
from settlement.ledger.group_commit import GroupCommitWorker, atomic_alone
from settlement.ledger.models import (
    LEDGER_THREADS,
    REASON_LENGTH,
    Payment,
    PaymentState,
    StoredResponse,
    create_ledger_engine,
    note_disconnect,
    utcnow,
)
from settlement.ledger.outbox import EVENT_OF, Subscriptions, emit_payment_event
from settlement.ledger.reads import LedgerReads, _payment
from settlement.ledger.refund_book import GUARD_CODES, RefundTransitions
from settlement.ledger.statements import HotStatements
from settlement.ledger.transitions import (
    FROM_BEGIN_SETTLEMENT,
    FROM_FAIL,
    FROM_MARK_PENDING,
    FROM_MARK_SETTLED,
    FROM_MINED,
    FROM_SETTLED,
    FROM_SETTLING,
    FROM_VERIFIED,
    KEEP,
    TRANSITIONS,
    gas_fields,
)

__all__ = ["TRANSITIONS", "Ledger", "settled_copy"]

_T = TypeVar("_T")


class Ledger(LedgerReads, RefundTransitions):
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = create_ledger_engine(url)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot open the ledger database ({type(exc).__name__})") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The same pool, its connections in autocommit: for calls of one statement (``_connection``).
        server = self.engine.dialect.name != "sqlite"
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT") if server else None
        # The hot path's statements, compiled once for this database (settlement.ledger.statements).
        self._hot = HotStatements(self.engine.dialect)
        # The event loop never waits on the database: calls run on the ledger's threads. SQLite takes one writer at a time (its
        # lock waits sleep in whole ms): one thread commits the calls queued together; a server database: a pool of threads.
        self._batch = threading.local()
        self.subscriptions: Subscriptions | None = None  # who wants which events (gateway.ops.webhooks); None: no webhooks
        if self.engine.dialect.name == "sqlite":
            self.executor: Executor = GroupCommitWorker(self.engine, self._batch)
            # The audit trail shares the file's one thread (gateway.pipeline.pipeline), between batches.
            self.shared_executor: Executor | None = self.executor
        else:
            self.executor = ThreadPoolExecutor(max_workers=LEDGER_THREADS, thread_name_prefix="x402gw-ledger")
            self.shared_executor = None

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the ledger's threads, awaited from the event loop; on SQLite
        it may share its transaction (and commit) with the calls queued with it."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if isinstance(self.executor, GroupCommitWorker):
            return await self.executor.submit_grouped_on(call, loop)
        return await loop.run_in_executor(self.executor, call)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.engine.dispose()

    @contextmanager
    def _connection(self, *, one_statement: bool = False) -> Iterator[Connection]:
        """One Core transaction (the hot path skips the ORM's unit of work). ``one_statement`` (or
        reads only): on a server database, autocommit, without BEGIN and COMMIT round trips."""
        shared = getattr(self._batch, "connection", None)
        with self._errors():
            if shared is not None:
                yield shared  # committed with its group (``GroupCommitWorker``)
            elif one_statement and self._autocommit is not None:
                with self._autocommit.connect() as connection:
                    yield connection
            else:
                with self.engine.begin() as connection:
                    yield connection

    @contextmanager
    def _session(self) -> Iterator[Session]:
        shared = getattr(self._batch, "connection", None)
        with self._errors():
            if shared is not None:
                # Its own savepoint: a failed flush rolls back this call, not the group's transaction.
                with Session(bind=shared, expire_on_commit=False, join_transaction_mode="create_savepoint") as session:
                    yield session
                    session.flush()
            else:
                with self._sessions.begin() as session:
                    yield session

    @contextmanager
    def holding(self, payment_id: int) -> Iterator[None]:
        """The ledger calls made inside (on this thread) in one transaction that locks the row first (FOR UPDATE on a server
        database; SQLite: its write lock): a read and the write depending on it, no other write between."""
        if getattr(self._batch, "connection", None) is not None:
            yield  # a group transaction (SQLite's one writer) already holds the write lock
            return
        with self._errors(), self.engine.begin() as connection:
            if self._autocommit is None:  # SQLite: a read, then a write on a snapshot grown stale meanwhile, would fail
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.execute(_STATE_FOR_UPDATE, {"pid": payment_id})
            self._batch.connection = connection
            try:
                yield
            finally:
                self._batch.connection = None

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database errors as ``LedgerError``; an ``IntegrityError`` as itself (callers handle it)."""
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            if getattr(exc, "connection_invalidated", False):
                note_disconnect(self.engine)  # the pool's other connections are suspect now
            raise LedgerError(f"ledger write failed ({type(exc).__name__})") from exc

    @atomic_alone
    def record_verified(self, **fields: Any) -> Payment:
        """Insert a verified payment. If this authorization already has a row that moved no money (voided, or failed before
        broadcast), that row is reused; otherwise the existing row is returned unchanged with ``state`` telling the caller what
        happened before."""
        fields.setdefault("state", PaymentState.VERIFIED.value)
        try:
            with self._connection(one_statement=True) as connection:
                now = utcnow()
                values = {"created_at": now, "updated_at": now, **fields}
                cursor = self._hot.get(_INSERT_PAYMENT, values, _INSERT_DEFAULTS).execute(connection, values)
                key = cursor.fetchone()
                cursor.close()
                return _payment({**_INSERT_DEFAULTS, **values, "id": key[0]})
        except IntegrityError:
            pass
        with self._session() as session:
            existing = session.scalars(
                select(Payment).where(
                    Payment.network == fields["network"],
                    Payment.asset == fields["asset"],
                    Payment.payer == fields["payer"],
                    Payment.nonce == fields["nonce"],
                )
            ).one()
            if existing.state == PaymentState.VOIDED or (existing.state == PaymentState.FAILED and not existing.tx_hash):
                # Nothing moved under this authorization: the row now describes the new attempt.
                for stale_field in ("upstream_status", "error_reason", "tx_hash", "block_number", "payment_identifier", "fingerprint"):
                    setattr(existing, stale_field, None)
                stale = session.get(StoredResponse, existing.id)
                if stale is not None:
                    session.delete(stale)
                for key, value in fields.items():
                    setattr(existing, key, value)
                existing.state = PaymentState.VERIFIED.value
            return existing

    def begin_settlement(
        self, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes] | None,
        tx_hash: str | None = None, amount: int | None = None, request_id: str | None = None,
    ) -> None:
        """Write-ahead: the row goes to ``settling`` and the answer being bought is stored, in one transaction, before any
        transaction is broadcast (with its hash, when it is known). ``amount``: what is being settled when it is only known now
        (an ``upto`` charge counted from the answer), so a restart reconciles the very amount that was sent. ``request_id``:
        only the request that owns the row (``take_over`` hands a dead one's row to its successor)."""
        values: dict[str, Any] = {"state": PaymentState.SETTLING.value}
        if tx_hash is not None:
            values["tx_hash"] = tx_hash
        if amount is not None:
            values["amount"] = amount
        if response is not None:
            values["upstream_status"] = response[0]
        with self._connection() as connection:
            _transition(self._hot, connection, payment_id, FROM_BEGIN_SETTLEMENT, values, "begin_settlement",
                        None if request_id is None else {"owning_request": request_id})
            if response is not None:
                self._put_stored(connection, payment_id, response)

    @atomic_alone
    def take_over(self, payment_id: int, previous: str, fields: Mapping[str, Any]) -> bool:
        """A ``verified`` row still owned by request ``previous`` (dead) now describes ``fields``' request. False: it moved on."""
        values = {**fields, "updated_at": utcnow()}
        with self._connection(one_statement=True) as connection:
            return bool(connection.execute(update(_PAYMENTS).where(
                _PAYMENTS.c.id == payment_id, _PAYMENTS.c.state == PaymentState.VERIFIED.value,
                _PAYMENTS.c.request_id == previous,
            ).values(**values)).rowcount)

    def store_response(self, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes]) -> None:
        """The answer a payment bought, replacing any stored before (an upfront call, a stream)."""
        with self._connection() as connection:
            self._put_stored(connection, payment_id, response)

    def _put_stored(self, connection: Connection, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes]) -> None:
        status, headers, body = response
        self._hot.get(_DELETE_STORED).execute(connection, {"pid": payment_id}).close()
        stored = {"payment_id": payment_id, "status": status, "headers": json.dumps(headers), "body": body, "created_at": utcnow()}
        self._hot.get(_INSERT_STORED, stored).execute(connection, stored).close()


    # Named transitions: the only writes of a row after ``record_verified``. Each is one guarded
    # UPDATE (``_transition``). ``KEEP`` leaves a column as it is; ``None`` clears it.

    def _move(self, name: str, payment_id: int, allowed: tuple[str, ...], values: dict[str, Any],
              guard: dict[str, Any] | None = None) -> None:
        values = {key: value for key, value in values.items() if value is not KEEP}
        if isinstance(values.get("error_reason"), str):  # may be a remote facilitator's: fit the column
            values["error_reason"] = values["error_reason"][:REASON_LENGTH]
        subscriptions = self.subscriptions
        with self._connection(one_statement=subscriptions is None or name not in EVENT_OF) as connection:
            if subscriptions is None or name not in EVENT_OF:
                _transition(self._hot, connection, payment_id, allowed, values, name, guard)
                return
            # Locked until commit (PostgreSQL; SQLite has one writer): a concurrent same transition
            # waits and then sees the new state, so one change is one event.
            before = connection.execute(_STATE_FOR_UPDATE, {"pid": payment_id}).scalar_one_or_none()
            _transition(self._hot, connection, payment_id, allowed, values, name, guard)
            if "state" not in values or values["state"] != before:  # a repeated transition is no new event
                row = connection.execute(_BY_ID, {"pid": payment_id}).mappings().one()
                emit_payment_event(connection, subscriptions, name, row)

    @contextmanager
    def outbox_transaction(self) -> Iterator[Connection]:
        """A transaction for the webhook outbox's own rows (``settlement.ledger.outbox``: claims,
        attempts, replays, events outside the ledger's transitions), never for payments."""
        with self._connection() as connection:
            yield connection

    @atomic_alone
    def record_tx_hash(self, payment_id: int, tx_hash: str) -> None:
        """The hash of a transaction about to be broadcast (``settling``; no state change)."""
        self._move("record_tx_hash", payment_id, FROM_SETTLING, {"tx_hash": tx_hash})

    @atomic_alone
    def mark_settled(
        self, payment_id: int, *, tx_hash: Any = KEEP, block_number: Any = KEEP, gas: Mapping[str, int] | None = None,
    ) -> None:
        self._move("mark_settled", payment_id, FROM_MARK_SETTLED, {
            "state": PaymentState.SETTLED.value, "tx_hash": tx_hash, "block_number": block_number, **gas_fields(gas),
        })

    @atomic_alone
    def mark_pending(self, payment_id: int, *, tx_hash: Any = KEEP, error_reason: Any = KEEP) -> None:
        self._move("mark_pending", payment_id, FROM_MARK_PENDING, {
            "state": PaymentState.PENDING.value, "tx_hash": tx_hash, "error_reason": error_reason,
        })

    @atomic_alone
    def fail(
        self, payment_id: int, reason: str | None, *, tx_hash: Any = KEEP, block_number: Any = KEEP,
        gas: Mapping[str, int] | None = None,
    ) -> None:
        self._move("fail", payment_id, FROM_FAIL, {
            "state": PaymentState.FAILED.value, "error_reason": reason, "tx_hash": tx_hash,
            "block_number": block_number, **gas_fields(gas),
        })

    @atomic_alone
    def record_gas(self, payment_id: int, gas: Mapping[str, int]) -> None:
        """The gas of a mined settlement transaction, read from its receipt after the fact
        (``settlement.finance.gas.backfill_gas``; settled or failed, no state change)."""
        self._move("record_gas", payment_id, FROM_MINED, gas_fields(gas))

    @atomic_alone
    def void(self, payment_id: int, reason: str | None, *, upstream_status: Any = KEEP) -> None:
        """The upstream failed before settlement: nothing is charged."""
        self._move("void", payment_id, FROM_VERIFIED, {
            "state": PaymentState.VOIDED.value, "error_reason": reason, "upstream_status": upstream_status,
        })


_PAYMENTS: Table = Payment.__table__  # type: ignore[assignment]  # declarative tables are Tables
_STORED: Table = StoredResponse.__table__  # type: ignore[assignment]
_COLUMNS = frozenset(_PAYMENTS.c.keys())

# The hot path's statements, built once: parameters are bound at execution (an UPDATE's SET list
# comes from the keys given), so no statement is constructed, coerced and cache-keyed per call.
_INSERT_PAYMENT = insert(_PAYMENTS).returning(_PAYMENTS.c.id)
# One guarded UPDATE per set of states a transition may leave (the states are literals of the
# statement: an expanding IN would be re-rendered at every execution).
_TRANSITIONS = {
    allowed: update(_PAYMENTS).where(
        _PAYMENTS.c.id == bindparam("pid"), or_(*(_PAYMENTS.c.state == state for state in allowed))
    )
    for allowed in set(TRANSITIONS.values()) | {FROM_BEGIN_SETTLEMENT}
}
_STATE_OF = select(_PAYMENTS.c.state).where(_PAYMENTS.c.id == bindparam("pid"))
_BY_ID = select(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("pid"))
_STATE_FOR_UPDATE = _STATE_OF.with_for_update()
# Guarded in the one UPDATE (no extra read): begin_settlement by the request owning the row; a refund
# owed once, claimed by one payer at a time (its transaction still the one it read), paid once.
_SETTLED_ONLY = _TRANSITIONS[FROM_SETTLED]
_GUARDED = {"begin_settlement": _TRANSITIONS[FROM_BEGIN_SETTLEMENT].where(_PAYMENTS.c.request_id == bindparam("owning_request")),
            "record_refund_owed": _SETTLED_ONLY.where(_PAYMENTS.c.refund_owed.is_(None)),
            "record_upstream_status": _SETTLED_ONLY.where(_PAYMENTS.c.refund_owed.is_(None)),
            "record_answer_lost": _SETTLED_ONLY.where(_PAYMENTS.c.refund_owed.is_(None), _PAYMENTS.c.upstream_status.is_(None)),
            "record_refund_tx": _SETTLED_ONLY.where(_PAYMENTS.c.refunded_at.is_(None),
                                                    func.coalesce(_PAYMENTS.c.refund_tx, "") == bindparam("previous_refund_tx")),
            "record_refund_paid": _SETTLED_ONLY.where(_PAYMENTS.c.refunded_at.is_(None))}
_DELETE_STORED = delete(_STORED).where(_STORED.c.payment_id == bindparam("pid"))
_INSERT_STORED = insert(_STORED)


# Column defaults a plain INSERT applies, so the returned row reads as a reloaded one would.
_INSERT_DEFAULTS = {
    column.key: column.default.arg
    for column in _PAYMENTS.c
    if isinstance(column.default, ScalarElementColumnDefault)
}
for _column in _PAYMENTS.c:
    if _column.key not in _INSERT_DEFAULTS and _column.nullable and not _column.primary_key:
        _INSERT_DEFAULTS[_column.key] = None


def _transition(
    hot: HotStatements, connection: Connection, payment_id: int, allowed: tuple[str, ...], values: dict[str, Any],
    name: str, guard: dict[str, Any] | None = None,
) -> None:
    """One UPDATE of the row, only from the states in ``allowed`` (and, with ``guard``'s parameters,
    only as ``_GUARDED[name]`` further allows); otherwise nothing is written and ``invalid_transition``
    (or ``ledger_row_missing``, or the guard's own code) is raised."""
    unknown = values.keys() - _COLUMNS
    if unknown:
        raise AttributeError(f"payments has no column {sorted(unknown)[0]!r}")
    values.setdefault("updated_at", utcnow())
    statement, params = _TRANSITIONS[allowed], {"pid": payment_id, **values}
    if guard is not None:
        statement = _GUARDED[name]
        params.update(guard)
    cursor = hot.get(statement, values).execute(connection, params)
    changed = cursor.rowcount
    cursor.close()
    if changed == 0:
        state = connection.execute(_STATE_OF, {"pid": payment_id}).scalar_one_or_none()
        if state is None:
            raise LedgerError(f"payment {payment_id} not found", code="ledger_row_missing")
        if state in allowed and guard is not None:  # the guard: another request owns the row, owes its refund...
            raise LedgerError(f"payment {payment_id}: {name} taken by another request", code=GUARD_CODES[name])
        raise LedgerError(
            f"payment {payment_id}: {name} is not allowed from state {state!r} (only from {', '.join(allowed)})",
            code="invalid_transition",
        )


_PAYMENT_COLUMNS = tuple(column.key for column in Payment.__table__.columns)


def settled_copy(row: Payment, *, tx_hash: str, block_number: int | None, amount: int) -> Payment:
    """A detached copy of ``row`` as ``mark_settled`` (with ``begin_settlement``'s amount) leaves it:
    nothing is written. What a paid answer's receipt is derived from without reading the row back."""
    values = {column: getattr(row, column) for column in _PAYMENT_COLUMNS}
    values.update(state=PaymentState.SETTLED.value, tx_hash=tx_hash, block_number=block_number, amount=amount)
    return _payment(values)
