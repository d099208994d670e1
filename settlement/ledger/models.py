"""The ledger's tables (SQLAlchemy 2.0 typed models) and how to open its database.

Amounts are Python ints in atomic units, stored exactly (NUMERIC(78,0) on PostgreSQL, decimal text
on SQLite, which has no exact wide integer). The audit trail's tables share this metadata
(``settlement.audit.records``), so one set of migrations owns the whole database.
"""

from __future__ import annotations

import enum
import time
import weakref
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

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
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "OPEN_STATES",
    "AtomicAmount",
    "Base",
    "Payment",
    "PaymentState",
    "StoredResponse",
    "create_ledger_engine",
    "note_disconnect",
    "utcnow",
]


class PaymentState(enum.StrEnum):
    VERIFIED = "verified"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"
    PENDING = "pending"
    VOIDED = "voided"


OPEN_STATES = (PaymentState.SETTLING, PaymentState.PENDING)
REASON_LENGTH = 128  # error_reason: longer ones (a remote facilitator's) are cut to fit, not refused


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
    error_reason: Mapped[str | None] = mapped_column(String(REASON_LENGTH), default=None)
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
    # Gas the settlement key paid for this payment's transaction (settlement.chain.gas): the
    # receipt's gasUsed and effectiveGasPrice, and this payment's share of their product in wei
    # (a batch shares one transaction). None: not known yet (ledger backfill-gas reads receipts).
    gas_used: Mapped[int | None] = mapped_column(BigInteger, default=None)
    gas_price: Mapped[int | None] = mapped_column(AtomicAmount(), default=None)
    gas_cost: Mapped[int | None] = mapped_column(AtomicAmount(), default=None)


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


# The threads a server database's ledger runs its calls on (settlement.ledger.payments), and the
# connections its engine keeps open for them and for the few other callers (reads, the outbox).
LEDGER_THREADS = 8
POOL_SIZE = LEDGER_THREADS + 4
POOL_OVERFLOW = 8


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
    # Kept open: the ledger's pool of threads (LEDGER_THREADS) and a few more callers at once. With
    # SQLAlchemy's default of 5, three of those threads opened a new PostgreSQL connection per call
    # under load (and closed it on return): a server process forked per ledger write.
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    pings = _PINGS[engine] = _Pings()
    event.listen(engine, "checkin", pings.checked_in)
    event.listen(engine, "checkout", pings.checkout)
    return engine


# A pooled connection idle for longer than this is pinged before it is handed out (a dead one is
# replaced). One that was in use moments ago is not: pinging on every checkout (pool_pre_ping) cost
# a round trip per ledger call. Once a call has lost its connection (``note_disconnect``), every
# connection returned before that is pinged too: a server that restarts under load fails the calls
# in flight (closed: a LedgerError), and the calls after them get live connections.
IDLE_PING_SECONDS = 2.0


class _Pings:
    """The ping rule of one engine's pool (``checkin`` and ``checkout`` listeners)."""

    def __init__(self) -> None:
        self.disconnected_at = float("-inf")  # monotonic time of the last connection lost in use

    def checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        record.info["x402gw_idle_since"] = time.monotonic()

    def checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("x402gw_idle_since")
        if since is None:
            return  # just connected
        if time.monotonic() - since < IDLE_PING_SECONDS and since > self.disconnected_at:
            return  # in use moments ago, and no connection has been lost since
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()  # leave no transaction open: the caller may want autocommit
        except Exception as exc:
            # The pool discards it and checks out another (a fresh one if the server restarted).
            raise DisconnectionError(f"pooled connection failed its ping ({type(exc).__name__})") from exc


_PINGS: weakref.WeakKeyDictionary[Engine, _Pings] = weakref.WeakKeyDictionary()


def note_disconnect(engine: Engine) -> None:
    """A call on ``engine`` lost its connection: ping every pooled connection returned before now."""
    pings = _PINGS.get(engine)
    if pings is not None:
        pings.disconnected_at = time.monotonic()
