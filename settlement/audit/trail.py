"""The audit trail: an append-only, hash-chained record of every decision the gateway takes.

Each record carries a sequence number and the hash of the record before it; its own hash is the
sha256 of a canonical JSON document of its content, that sequence number and that previous hash::

    hash(n) = sha256(canonical({v, seq, at, requestId, event, payer, tool, data, prev: hash(n-1)}))

so an edited, inserted, deleted or reordered record breaks the chain where it happened, and
``verify`` names it. The chain head (last sequence number and hash) is one row, locked by every
append (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite): appends from
threads, engines and processes sharing one database form a single unbroken chain.

A hash chain without a secret proves order and integrity against anyone who cannot rewrite the
whole tail; keep the head (``x402gw audit verify`` prints it) somewhere else to pin it.

``AuditTrail`` is synchronous (SQLAlchemy); ``AuditWriter`` is its asyncio front: a bounded queue
and one writer task that commits the events of many requests per transaction, off the event loop.
Records are never dropped silently: a full queue writes in a worker thread instead, and a write
that keeps failing is logged record by record.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, String, event, insert, select, type_coerce, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from settlement.audit.canonical import canonical_json, clean_fields, plain_text, record_hash
from settlement.audit.chain import VerifyReport, verify_chain
from settlement.audit.ledger_check import LedgerCheck
from settlement.audit.records import (
    AUDIT_TABLES,
    GENESIS_HASH,
    HEAD_ID,
    AuditEvent,
    AuditHead,
    StoredRecord,
)
from settlement.errors import LedgerError
from settlement.ledger.models import Base, create_ledger_engine, note_disconnect, utcnow
from settlement.ledger.statements import HotStatements

__all__ = ["AuditTrail", "create_audit_engine"]

_RECORDS, _HEAD = AUDIT_TABLES
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID).with_for_update()
_INSERT_RECORDS = insert(_RECORDS)
_UPDATE_HEAD = update(_HEAD).where(_HEAD.c.id == HEAD_ID)
_RECORD_KEYS = ("seq", "recorded_at", "request_id", "event", "payer", "tool", "data", "prev_hash", "hash")


def create_audit_engine(url: str) -> Engine:
    """The ledger's engine setup; on SQLite every transaction starts with ``BEGIN IMMEDIATE`` so
    the chain head is read under the database's single write lock (pysqlite would defer it)."""
    engine = create_ledger_engine(url)
    if engine.dialect.name == "sqlite":

        def no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            # Records go into seven indexes, two keyed by random values (hash, request id): a 16 MB
            # page cache keeps their upper levels in memory as the table grows, and checkpointing
            # the WAL every 10,000 pages rather than 1,000 writes a page rewritten by many appends
            # once. Durability is the ledger's WAL setting, unchanged.
            cursor.execute("PRAGMA cache_size=-16384")
            cursor.execute("PRAGMA wal_autocheckpoint=10000")
            cursor.close()

        def begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        event.listen(engine, "connect", no_driver_transactions)
        event.listen(engine, "begin", begin_immediate)
    return engine


class AuditTrail:
    """Appends to, reads and verifies the chain in one database (the ledger's, by default)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise LedgerError("the database URL cannot be parsed", code="invalid_setting") from None
        if parsed.database in (None, "", ":memory:") and parsed.get_backend_name() == "sqlite":
            raise LedgerError("the audit trail needs a database file or server, not an in-memory SQLite")
        # Writers in this process queue here rather than on the database lock.
        self._lock = threading.Lock()
        try:
            self.engine = create_audit_engine(url)
            Base.metadata.create_all(self.engine, tables=AUDIT_TABLES)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            self._hot = HotStatements(self.engine.dialect)
            self._ensure_head()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot open the audit trail ({type(exc).__name__})") from exc

    def close(self) -> None:
        self.engine.dispose()

    def _ensure_head(self) -> None:
        values = {"id": HEAD_ID, "seq": 0, "hash": GENESIS_HASH, "updated_at": utcnow()}
        with self._sessions.begin() as session:
            if session.get(AuditHead, HEAD_ID) is not None:
                return
            dialect = self.engine.dialect.name
            if dialect in ("postgresql", "sqlite"):
                # Two processes may start at once: the second insert is a no-op, not an error.
                upsert = pg_insert if dialect == "postgresql" else sqlite_insert
                session.execute(upsert(AuditHead).values(**values).on_conflict_do_nothing())
                return
        try:
            with self._sessions.begin() as session:
                session.execute(insert(AuditHead).values(**values))
        except IntegrityError:
            pass  # another process created it first

    def append(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append events in one transaction, in order; returns their sequence numbers."""
        if not events:
            return []
        try:
            # Core statements built once and run on the driver's cursor (settlement.ledger.statements):
            # SQLAlchemy's own execution cost more than the records' hashes (bench/stage_cpu.py).
            with self._lock, self.engine.begin() as connection:
                cursor = self._hot.get(_HEAD_FOR_UPDATE).execute(connection, {})
                first, prev = cursor.fetchone()
                cursor.close()
                seq = first
                rows: list[dict[str, Any]] = []
                for item in events:
                    seq += 1
                    at = item.at
                    if at.tzinfo is not UTC:
                        at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
                    data = canonical_json(clean_fields(item.fields))
                    request_id, event_name, payer, tool = item.request_id, item.event, item.payer, item.tool
                    if not (data.isascii() and request_id.isascii() and event_name.isascii()
                            and (payer is None or payer.isascii()) and (tool is None or tool.isascii())):
                        # Maybe a lone surrogate (no UTF-8 form to hash or store): cleaned to text.
                        request_id, event_name, payer, tool = (plain_text(t) for t in (request_id, event_name, payer, tool))
                        data = canonical_json(plain_text(clean_fields(item.fields)))
                    digest = record_hash(seq, at, request_id, event_name, payer, tool, data, prev)
                    rows.append({
                        "seq": seq, "recorded_at": at, "request_id": request_id, "event": event_name,
                        "payer": payer, "tool": tool, "data": data, "prev_hash": prev, "hash": digest,
                    })
                    prev = digest
                # One executemany, no RETURNING: an ORM object per record cost more than its hash.
                self._hot.get(_INSERT_RECORDS, _RECORD_KEYS).execute_many(connection, rows)
                head = {"seq": seq, "hash": prev, "updated_at": utcnow()}
                self._hot.get(_UPDATE_HEAD, head).execute(connection, head).close()
                return list(range(first + 1, seq + 1))
        except SQLAlchemyError as exc:
            if getattr(exc, "connection_invalidated", False):
                note_disconnect(self.engine)  # the pool's other connections are suspect now
            raise LedgerError(f"audit append failed ({type(exc).__name__})", code="audit_unavailable") from exc

    def head(self) -> tuple[int, str]:
        with self._sessions() as session:
            row = session.get(AuditHead, HEAD_ID)
            return (row.seq, row.hash) if row is not None else (0, GENESIS_HASH)

    def records(
        self, *, from_seq: int | None = None, to_seq: int | None = None,
        since: datetime | None = None, until: datetime | None = None, page: int = 1000,
    ) -> Iterator[StoredRecord]:
        """Records in chain order, read page by page (keyset on ``seq``): any size, flat memory."""
        after: Any = (from_seq - 1) if from_seq is not None else None
        while True:
            query = self._select().order_by(_RECORDS.c.seq).limit(page)
            if after is not None:
                query = query.where(_RECORDS.c.seq > after)
            if to_seq is not None:
                query = query.where(_RECORDS.c.seq <= to_seq)
            if since is not None:
                query = query.where(_RECORDS.c.recorded_at >= since)
            if until is not None:
                query = query.where(_RECORDS.c.recorded_at < until)
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
            yield from (StoredRecord.of_values(*row) for row in rows)
            if len(rows) < page:
                return
            after = rows[-1].seq  # as stored: an edited, unreadable one still moves the page on

    def for_request(self, request_id: str) -> list[StoredRecord]:
        query = self._select().where(_RECORDS.c.request_id == request_id).order_by(_RECORDS.c.seq)
        with self.engine.connect() as connection:
            return [StoredRecord.of_values(*row) for row in connection.execute(query)]

    def _select(self) -> Select[Any]:
        """The records' columns as stored: SQLite's time as its text (an edit may have left any text
        there, which SQLAlchemy's DATETIME would raise on), read by ``StoredRecord.of_values``."""
        at: Any = _RECORDS.c.recorded_at
        if self.engine.dialect.name == "sqlite":
            at = type_coerce(at, String)
        c = _RECORDS.c
        return select(c.id, c.seq, at, c.request_id, c.event, c.payer, c.tool, c.data, c.prev_hash, c.hash)

    def verify(self, anchor: tuple[int, str] | None = None, *, ledger: bool = False) -> VerifyReport:
        """The chain; with ``ledger``, each ``settled`` record against its payment row too
        (``settlement.audit.ledger_check``)."""
        if not ledger:
            return verify_chain(self.records(), head=self.head(), anchor=anchor)
        check = LedgerCheck(self.engine)
        report = verify_chain(check.watch(self.records()), head=self.head(), anchor=anchor)
        report.problems.extend(check.problems)
        report.ledger_checked = check.checked
        return report
