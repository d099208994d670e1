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

    Also allowed, as the flows need them: ``begin_settlement`` settling→settling (a re-signed
    broadcast's new hash), ``fail`` and ``mark_pending`` from verified (refused or unknown before
    the write-ahead hook ran), ``mark_settled`` settled→settled and ``fail`` failed→failed (a
    reconcile that got there first). ``record_verified`` reuses a voided row, or a failed one
    without a transaction hash, as a fresh ``verified`` row.

    No state change: ``record_tx_hash`` (settling), ``record_upstream_status``,
    ``record_refund_owed``, ``record_refund_tx``, ``record_refund_paid`` (settled).

Amounts are Python ints in atomic units, stored exactly (NUMERIC(78,0) on PostgreSQL, decimal text
on SQLite, which has no exact wide integer). The repository never decides policy; it records.
Calls are synchronous: the gateway runs them off the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, RowMapping, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from settlement.errors import LedgerError


_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _atomic_alone(fn: _F) -> _F:
    """Marks a ledger call that needs no savepoint of its own in a group transaction: it writes at
    most one statement (SQLite undoes a failing statement by itself), or its ORM part takes its own
    savepoint (``_session``). Every other call gets a savepoint."""
    fn.atomic_alone = True  # type: ignore[attr-defined]
    return fn


class PaymentState(enum.StrEnum):
    VERIFIED = "verified"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"
    PENDING = "pending"
    VOIDED = "voided"


OPEN_STATES = (PaymentState.SETTLING, PaymentState.PENDING)


class AtomicAmount(TypeDecorator[int]):
    """An unsigned token amount in atomic units, exact up to 78 digits on every backend."""

    impl = Numeric(78, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(78))
        return dialect.type_descriptor(Numeric(78, 0, asdecimal=True))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("amounts are ints in atomic units")
        return str(value) if dialect.name == "sqlite" else Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (UniqueConstraint("network", "asset", "payer", "nonce", name="uq_payment_authorization"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    tool: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(2048))
    payer: Mapped[str] = mapped_column(String(42), index=True)
    pay_to: Mapped[str] = mapped_column(String(42), index=True)
    amount: Mapped[int] = mapped_column(AtomicAmount())
    network: Mapped[str] = mapped_column(String(64))
    asset: Mapped[str] = mapped_column(String(42))
    nonce: Mapped[str] = mapped_column(String(66))
    valid_before: Mapped[int] = mapped_column(BigInteger)
    authorization: Mapped[str] = mapped_column(Text)  # signed authorization JSON: what a reconcile re-checks
    state: Mapped[str] = mapped_column(String(16), index=True)
    error_reason: Mapped[str | None] = mapped_column(String(128), default=None)
    upstream_status: Mapped[int | None] = mapped_column(Integer, default=None)
    tx_hash: Mapped[str | None] = mapped_column(String(66), default=None, index=True)
    block_number: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Idempotency: the x402 payment-identifier and the fingerprint of the request it was used for.
    payment_identifier: Mapped[str | None] = mapped_column(String(128), default=None, unique=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64), default=None)
    settle_mode: Mapped[str] = mapped_column(String(16), default="after")
    # Settled first (upfront), then the upstream failed: what is owed back, and how it was paid.
    refund_owed: Mapped[int | None] = mapped_column(AtomicAmount(), default=None)
    refund_reason: Mapped[str | None] = mapped_column(String(128), default=None)
    refund_tx: Mapped[str | None] = mapped_column(String(66), default=None)
    refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Decimals of the asset, so an atomic amount reads as an exact decimal without a chain call.
    decimals: Mapped[int] = mapped_column(Integer, default=6, server_default="6")


class StoredResponse(Base):
    """The upstream answer a payment bought, kept so a resend of the same payment (a retry after a
    disconnect, a crash, or a pending settlement) gets it without a second charge or upstream call."""

    __tablename__ = "stored_responses"

    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[int] = mapped_column(Integer)
    headers: Mapped[str] = mapped_column(Text)  # JSON list of [name, value]
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_ledger_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True)


class _Keep:
    """Leave the column as it is (``None`` clears it)."""

    def __repr__(self) -> str:
        return "KEEP"


_KEEP: Any = _Keep()

_V, _SG, _SD, _F, _P = (s.value for s in (
    PaymentState.VERIFIED, PaymentState.SETTLING, PaymentState.SETTLED, PaymentState.FAILED, PaymentState.PENDING,
))
# The states each transition may leave (see the module docstring).
_FROM_BEGIN_SETTLEMENT = (_V, _SG)
_FROM_SETTLING = (_SG,)
_FROM_MARK_SETTLED = (_SG, _P, _SD)
_FROM_MARK_PENDING = (_V, _SG, _P)
_FROM_FAIL = (_V, _SG, _P, _F)
_FROM_VERIFIED = (_V,)
_FROM_SETTLED = (_SD,)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "begin_settlement": _FROM_BEGIN_SETTLEMENT,
    "record_tx_hash": _FROM_SETTLING,
    "mark_settled": _FROM_MARK_SETTLED,
    "mark_pending": _FROM_MARK_PENDING,
    "fail": _FROM_FAIL,
    "void": _FROM_VERIFIED,
    "record_upstream_status": _FROM_SETTLED,
    "record_refund_owed": _FROM_SETTLED,
    "record_refund_tx": _FROM_SETTLED,
    "record_refund_paid": _FROM_SETTLED,
}


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = create_ledger_engine(url)
            from settlement.ledger.migrations import migrate  # imports this module: import on use

            migrate(self.engine)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot open the ledger database ({type(exc).__name__})") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The event loop never waits on the database: calls run on the ledger's own threads. SQLite
        # takes one writer at a time (its lock waits sleep in whole milliseconds), so it gets one
        # thread that commits the calls queued together in one transaction; a server database gets
        # a pool of threads and a transaction per call.
        self._batch = threading.local()
        if self.engine.dialect.name == "sqlite":
            self.executor: Executor = _GroupCommitWorker(self)
            # The audit trail shares the file's one thread (gateway.pipeline.pipeline), between batches.
            self.shared_executor: Executor | None = self.executor
        else:
            self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="x402gw-ledger")
            self.shared_executor = None

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the ledger's threads, awaited from the event loop; on SQLite
        it may share its transaction (and commit) with the calls queued with it."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if isinstance(self.executor, _GroupCommitWorker):
            return await asyncio.wrap_future(self.executor.submit_grouped(call), loop=loop)
        return await loop.run_in_executor(self.executor, call)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.engine.dispose()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """One Core transaction: the hot path's statements skip the ORM's unit of work."""
        shared = getattr(self._batch, "connection", None)
        try:
            if shared is not None:
                yield shared  # committed with its group (``_GroupCommitWorker``)
                return
            with self.engine.begin() as connection:
                yield connection
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed ({type(exc).__name__})") from exc

    @contextmanager
    def _session(self) -> Iterator[Session]:
        shared = getattr(self._batch, "connection", None)
        try:
            if shared is not None:
                # Its own savepoint: a failed flush rolls back this call, not the group's transaction.
                with Session(bind=shared, expire_on_commit=False, join_transaction_mode="create_savepoint") as session:
                    yield session
                    session.flush()
                return
            with self._sessions.begin() as session:
                yield session
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed ({type(exc).__name__})") from exc

    @_atomic_alone
    def record_verified(self, **fields: Any) -> Payment:
        """Insert a verified payment. If this authorization already has a row that moved no money
        (voided, or failed before broadcast), that row is reused; otherwise the existing row is
        returned unchanged with ``state`` telling the caller what happened before."""
        fields.setdefault("state", PaymentState.VERIFIED.value)
        try:
            with self._connection() as connection:
                now = utcnow()
                values = {"created_at": now, "updated_at": now, **fields}
                inserted = connection.execute(_INSERT_PAYMENT, values)
                return _payment({**_INSERT_DEFAULTS, **values, "id": inserted.inserted_primary_key[0]})
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
                existing.upstream_status = None
                existing.error_reason = None
                existing.tx_hash = None
                existing.block_number = None
                existing.payment_identifier = None
                existing.fingerprint = None
                stale = session.get(StoredResponse, existing.id)
                if stale is not None:
                    session.delete(stale)
                for key, value in fields.items():
                    setattr(existing, key, value)
                existing.state = PaymentState.VERIFIED.value
            return existing

    def begin_settlement(
        self, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes] | None,
        tx_hash: str | None = None,
    ) -> None:
        """Write-ahead: the row goes to ``settling`` and the answer being bought is stored, in one
        transaction, before any transaction is broadcast (with its hash, when it is known)."""
        values: dict[str, Any] = {"state": PaymentState.SETTLING.value}
        if tx_hash is not None:
            values["tx_hash"] = tx_hash
        if response is not None:
            values["upstream_status"] = response[0]
        with self._connection() as connection:
            _transition(connection, payment_id, _FROM_BEGIN_SETTLEMENT, values, "begin_settlement")
            if response is not None:
                status, headers, body = response
                connection.execute(_DELETE_STORED, {"pid": payment_id})
                connection.execute(_INSERT_STORED, {
                    "payment_id": payment_id, "status": status, "headers": json.dumps(headers), "body": body,
                    "created_at": utcnow(),
                })

    def store_response(self, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes]) -> None:
        with self._session() as session:
            self._store_response(session, payment_id, response)

    @staticmethod
    def _store_response(session: Session, payment_id: int, response: tuple[int, list[tuple[str, str]], bytes]) -> None:
        status, headers, body = response
        existing = session.get(StoredResponse, payment_id)
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(StoredResponse(payment_id=payment_id, status=status, headers=json.dumps(headers), body=body))

    @_atomic_alone
    def stored_response(self, payment_id: int) -> tuple[int, list[tuple[str, str]], bytes] | None:
        with self._session() as session:
            row = session.get(StoredResponse, payment_id)
            if row is None:
                return None
            return row.status, [(str(k), str(v)) for k, v in json.loads(row.headers)], bytes(row.body)

    @_atomic_alone
    def by_payment_identifier(self, identifier: str) -> Payment | None:
        with self._session() as session:
            return session.scalars(select(Payment).where(Payment.payment_identifier == identifier)).one_or_none()

    def open_payments(self) -> list[Payment]:
        """Rows whose outcome is not final: ``settling`` or ``pending``."""
        with self._session() as session:
            return list(
                session.scalars(
                    select(Payment).where(Payment.state.in_([s.value for s in OPEN_STATES])).order_by(Payment.id)
                )
            )

    # Named transitions: the only writes of a row after ``record_verified``. Each is one guarded
    # UPDATE (``_transition``). ``_KEEP`` leaves a column as it is; ``None`` clears it.

    def _move(self, name: str, payment_id: int, allowed: tuple[str, ...], values: dict[str, Any]) -> None:
        values = {key: value for key, value in values.items() if value is not _KEEP}
        with self._connection() as connection:
            _transition(connection, payment_id, allowed, values, name)

    @_atomic_alone
    def record_tx_hash(self, payment_id: int, tx_hash: str) -> None:
        """The hash of a transaction about to be broadcast (``settling``; no state change)."""
        self._move("record_tx_hash", payment_id, _FROM_SETTLING, {"tx_hash": tx_hash})

    @_atomic_alone
    def mark_settled(self, payment_id: int, *, tx_hash: Any = _KEEP, block_number: Any = _KEEP) -> None:
        self._move("mark_settled", payment_id, _FROM_MARK_SETTLED, {
            "state": PaymentState.SETTLED.value, "tx_hash": tx_hash, "block_number": block_number,
        })

    @_atomic_alone
    def mark_pending(self, payment_id: int, *, tx_hash: Any = _KEEP, error_reason: Any = _KEEP) -> None:
        self._move("mark_pending", payment_id, _FROM_MARK_PENDING, {
            "state": PaymentState.PENDING.value, "tx_hash": tx_hash, "error_reason": error_reason,
        })

    @_atomic_alone
    def fail(self, payment_id: int, reason: str | None, *, tx_hash: Any = _KEEP, block_number: Any = _KEEP) -> None:
        self._move("fail", payment_id, _FROM_FAIL, {
            "state": PaymentState.FAILED.value, "error_reason": reason, "tx_hash": tx_hash,
            "block_number": block_number,
        })

    @_atomic_alone
    def void(self, payment_id: int, reason: str | None, *, upstream_status: Any = _KEEP) -> None:
        """The upstream failed before settlement: nothing is charged."""
        self._move("void", payment_id, _FROM_VERIFIED, {
            "state": PaymentState.VOIDED.value, "error_reason": reason, "upstream_status": upstream_status,
        })

    @_atomic_alone
    def record_upstream_status(self, payment_id: int, status: int) -> None:
        """The upstream's status after an upfront settlement (``settled``; no state change)."""
        self._move("record_upstream_status", payment_id, _FROM_SETTLED, {"upstream_status": status})

    @_atomic_alone
    def record_refund_owed(self, payment_id: int, amount: int, reason: str | None) -> None:
        self._move("record_refund_owed", payment_id, _FROM_SETTLED, {"refund_owed": amount, "refund_reason": reason})

    @_atomic_alone
    def record_refund_tx(self, payment_id: int, tx_hash: str) -> None:
        """The refund transaction's hash, before it is broadcast."""
        self._move("record_refund_tx", payment_id, _FROM_SETTLED, {"refund_tx": tx_hash})

    @_atomic_alone
    def record_refund_paid(self, payment_id: int, tx_hash: str | None) -> None:
        self._move("record_refund_paid", payment_id, _FROM_SETTLED, {"refund_tx": tx_hash, "refunded_at": utcnow()})

    @_atomic_alone
    def get(self, payment_id: int) -> Payment | None:
        with self._session() as session:
            return session.get(Payment, payment_id)

    def by_request_id(self, request_id: str) -> Payment | None:
        with self._session() as session:
            return session.scalars(select(Payment).where(Payment.request_id == request_id)).one_or_none()

    @_atomic_alone
    def by_authorization(self, network: str, asset: str, payer: str, nonce: str) -> Payment | None:
        with self._connection() as connection:
            found = connection.execute(
                _BY_AUTHORIZATION, {"network": network, "asset": asset, "payer": payer, "nonce": nonce}
            ).one_or_none()
        return None if found is None else _payment(found._mapping)

    def all(self) -> list[Payment]:
        with self._session() as session:
            return list(session.scalars(select(Payment).order_by(Payment.id)))


_PAYMENTS = Payment.__table__
_STORED = StoredResponse.__table__
_COLUMNS = frozenset(_PAYMENTS.c.keys())

# The hot path's statements, built once: parameters are bound at execution (an UPDATE's SET list
# comes from the keys given), so no statement is constructed, coerced and cache-keyed per call.
_INSERT_PAYMENT = insert(_PAYMENTS)
_TRANSITION = update(_PAYMENTS).where(
    _PAYMENTS.c.id == bindparam("pid"), _PAYMENTS.c.state.in_(bindparam("allowed_from", expanding=True))
)
_STATE_OF = select(_PAYMENTS.c.state).where(_PAYMENTS.c.id == bindparam("pid"))
_BY_AUTHORIZATION = select(_PAYMENTS).where(
    _PAYMENTS.c.network == bindparam("network"),
    _PAYMENTS.c.asset == bindparam("asset"),
    _PAYMENTS.c.payer == bindparam("payer"),
    _PAYMENTS.c.nonce == bindparam("nonce"),
)
_DELETE_STORED = delete(_STORED).where(_STORED.c.payment_id == bindparam("pid"))
_INSERT_STORED = insert(_STORED)


# Column defaults a plain INSERT applies, so the returned row reads as a reloaded one would.
_INSERT_DEFAULTS = {
    column.key: column.default.arg
    for column in _PAYMENTS.c
    if column.default is not None and getattr(column.default, "is_scalar", False)
}
for _column in _PAYMENTS.c:
    if _column.key not in _INSERT_DEFAULTS and _column.nullable and not _column.primary_key:
        _INSERT_DEFAULTS[_column.key] = None


def _payment(mapping: RowMapping | dict[str, Any]) -> Payment:
    """A detached ``Payment`` from a Core row (the same attributes the ORM would load)."""
    return Payment(**mapping)


def _transition(
    connection: Connection, payment_id: int, allowed: tuple[str, ...], values: dict[str, Any], name: str
) -> None:
    """One UPDATE of the row, only from the states in ``allowed``; otherwise nothing is written and
    ``invalid_transition`` (or ``ledger_row_missing``) is raised."""
    unknown = values.keys() - _COLUMNS
    if unknown:
        raise AttributeError(f"payments has no column {sorted(unknown)[0]!r}")
    values.setdefault("updated_at", utcnow())
    result = connection.execute(_TRANSITION, {"pid": payment_id, "allowed_from": list(allowed), **values})
    if result.rowcount == 0:
        state = connection.execute(_STATE_OF, {"pid": payment_id}).scalar_one_or_none()
        if state is None:
            raise LedgerError(f"payment {payment_id} not found", code="ledger_row_missing")
        raise LedgerError(
            f"payment {payment_id}: {name} is not allowed from state {state!r} (only from {', '.join(allowed)})",
            code="invalid_transition",
        )


class _GroupCommitWorker(Executor):
    """The SQLite ledger's one thread. Calls queued while a transaction runs are run together in the
    next one, committed once, and only then answered: a caller that was told "written" is durable
    (the write-ahead rule), and a burst of payments costs one commit, not one each.

    Each call runs in its own savepoint: one that raises is answered with its error, leaves nothing
    behind, and undoes none of the others.
    ``submit`` runs a call alone, outside any group transaction (the audit trail's appends, which
    take the database's write lock with a connection of their own).
    """

    MAX_GROUP = 256

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any], bool] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="x402gw-ledger", daemon=True)
        self._thread.start()

    def submit_grouped(self, call: Callable[[], _T]) -> Future[_T]:
        return self._put(call, grouped=True)

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:  # type: ignore[override]
        return self._put(functools.partial(fn, *args, **kwargs), grouped=False)

    def _put(self, call: Callable[[], Any], *, grouped: bool) -> Future[Any]:
        if self._closed:
            raise LedgerError("the ledger is closed", code="ledger_closed")
        future: Future[Any] = Future()
        self._queue.put((call, future, grouped))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        held: tuple[Callable[[], Any], Future[Any], bool] | None = None
        while True:
            item = held if held is not None else self._queue.get()
            held = None
            if item is None:
                self._refuse_the_rest()
                return
            call, future, grouped = item
            if not grouped:
                self._answer([(future, *_outcome(call))])
                continue
            group = [(call, future)]
            while len(group) < self.MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or not nxt[2]:
                    held = nxt if nxt is not None else None
                    if nxt is None:
                        self._queue.put(None)
                    break
                group.append((nxt[0], nxt[1]))
            self._answer(self._run_group(group))

    def _run_group(self, group: list[tuple[Callable[[], Any], Future[Any]]]) -> list[tuple[Future[Any], bool, Any]]:
        if len(group) == 1:
            return [(group[0][1], *_outcome(group[0][0]))]
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self._ledger.engine.begin() as connection:
                # pysqlite begins lazily at the first write: begin now, so the savepoints below nest
                # in this one transaction (and the write lock is held from a fresh snapshot).
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                self._ledger._batch.connection = connection
                try:
                    for call, future in group:
                        if getattr(getattr(call, "func", None), "atomic_alone", False):
                            outcomes.append((future, *_outcome(call)))
                            continue
                        savepoint = connection.begin_nested()
                        ok, value = _outcome(call)
                        if ok:
                            savepoint.commit()
                        else:
                            savepoint.rollback()  # a failed call leaves nothing behind and undoes no other
                        outcomes.append((future, ok, value))
                finally:
                    self._ledger._batch.connection = None
        except Exception as exc:  # the commit (or BEGIN) failed: nothing of the group was written
            error = LedgerError(f"ledger write failed ({type(exc).__name__})")
            error.__cause__ = exc
            return [(future, False, error) for _, future in group]
        return outcomes

    def _refuse_the_rest(self) -> None:
        """Calls that raced ``shutdown`` past its stop marker are answered, not left waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(LedgerError("the ledger is closed", code="ledger_closed"))

    @staticmethod
    def _answer(outcomes: list[tuple[Future[Any], bool, Any]]) -> None:
        for future, ok, value in outcomes:
            if not future.set_running_or_notify_cancel():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, call()
    except BaseException as exc:  # handed to the caller, like an executor would
        return False, exc
