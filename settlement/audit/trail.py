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

import asyncio
import enum
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    Text,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from settlement.errors import LedgerError
from settlement.ledger.payments import Base, create_ledger_engine, utcnow

log = logging.getLogger("x402gw.audit")

HASH_VERSION = 1
GENESIS_HASH = "0" * 64
HEAD_ID = 1

# Field names whose values are credentials wherever they appear: replaced, never stored.
SECRET_FIELDS = frozenset(
    {"authorization", "signature", "headers", "header", "cookie", "cookies", "password", "secret",
     "token", "apikey", "api_key", "privatekey", "private_key", "payment", "paymentsignature"}
)
REDACTED = "[redacted]"

_BigId = BigInteger().with_variant(Integer, "sqlite")


class AuditRecord(Base):
    """One decision. Never updated, never deleted; ``seq`` is its place in the chain."""

    __tablename__ = "audit_records"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    # Not indexed (migration 0004): nothing reads by them, and every append would pay for them.
    event: Mapped[str] = mapped_column(String(64))
    payer: Mapped[str | None] = mapped_column(String(42), default=None)
    tool: Mapped[str | None] = mapped_column(String(64), default=None)
    data: Mapped[str] = mapped_column(Text)  # canonical JSON object of the event's fields
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))  # not unique (migration 0004): the chain is checked by verify


class AuditHead(Base):
    """The chain head: a single row (id 1) every append locks, reads and moves forward."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


AUDIT_TABLES = [Base.metadata.tables[name] for name in ("audit_records", "audit_head")]
_RECORDS, _HEAD = AUDIT_TABLES


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What a stage decided, before it has a place in the chain."""

    request_id: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    payer: str | None = None
    tool: str | None = None
    at: datetime = field(default_factory=utcnow)


# --- canonical form and hashing -------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# One encoder for every canonical document: ``json.dumps`` with options builds a new one per call.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable
)
# How the encoder above writes a str (ensure_ascii=False): used to write the hash document directly.
_json_string = json.encoder.encode_basestring


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def iso_utc(value: datetime) -> str:
    """Microsecond ISO-8601 in UTC; naive values (SQLite gives them back) are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.year >= 1000:  # isoformat pads the year to 4 digits, strftime's %Y does not: same text
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(
    seq: int, at: datetime | str, request_id: str, event: str, payer: str | None, tool: str | None,
    data: str, prev_hash: str,
) -> str:
    at_text = at if isinstance(at, str) else iso_utc(at)
    if (type(seq) is int and type(at_text) is str and type(request_id) is str and type(event) is str
            and type(data) is str and type(prev_hash) is str and (payer is None or type(payer) is str)
            and (tool is None or type(tool) is str)):
        # canonical_json(document) written out: keys in sorted order, the same escaping, no dict
        # to build and sort per record (this runs for every record appended and verified).
        text = (
            f'{{"at":{_json_string(at_text)},"data":{_json_string(data)},"event":{_json_string(event)},'
            f'"payer":{"null" if payer is None else _json_string(payer)},"prev":{_json_string(prev_hash)},'
            f'"requestId":{_json_string(request_id)},"seq":{int.__repr__(seq)},'
            f'"tool":{"null" if tool is None else _json_string(tool)},"v":{HASH_VERSION}}}'
        )
    else:
        text = canonical_json({
            "v": HASH_VERSION, "seq": seq, "at": at_text, "requestId": request_id,
            "event": event, "payer": payer, "tool": tool, "data": data, "prev": prev_hash,
        })
    return hashlib.sha256(text.encode()).hexdigest()


def redact_url(url: str) -> str:
    """Scheme, host, port and path only: userinfo, query and fragment can carry credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if not parts.scheme or not host:
        return url.split("?", 1)[0].split("#", 1)[0]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# Field name → (is a secret, names a URL). Names come from the stages' code: a small vocabulary,
# classified once each (bounded, in case a caller ever passes data-derived names).
_FIELD_KINDS: dict[str, tuple[bool, bool]] = {}


def _field_kind(key: str) -> tuple[bool, bool]:
    kind = _FIELD_KINDS.get(key)
    if kind is None:
        name = key.lower().replace("-", "").replace("_", "")
        kind = (name in SECRET_FIELDS or key.lower() in SECRET_FIELDS, name.endswith("url"))
        if len(_FIELD_KINDS) < 4096:
            _FIELD_KINDS[key] = kind
    return kind


def clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The last line of defence: credential-named fields are redacted, URLs lose their secrets."""
    cleaned: dict[str, Any] = {}
    for key, value in fields.items():
        secret, url_named = _field_kind(key)
        if secret:
            cleaned[key] = REDACTED
        elif isinstance(value, str) and (url_named or value.startswith(("http://", "https://"))):
            cleaned[key] = redact_url(value)
        elif isinstance(value, dict):
            cleaned[key] = clean_fields(value)
        else:
            cleaned[key] = value
    return cleaned


# --- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as read back (or as read from an export): what ``verify`` checks."""

    id: int | None
    seq: int
    at: str
    request_id: str
    event: str
    payer: str | None
    tool: str | None
    data: str
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, row: AuditRecord) -> StoredRecord:
        return cls(row.id, row.seq, iso_utc(row.recorded_at), row.request_id, row.event, row.payer, row.tool,
                   row.data, row.prev_hash, row.hash)

    @classmethod
    def from_json(cls, line: str) -> StoredRecord:
        item = json.loads(line)
        return cls(item.get("id"), item["seq"], item["at"], item["requestId"], item["event"], item.get("payer"),
                   item.get("tool"), canonical_json(item["data"]), item["prevHash"], item["hash"])

    def computed_hash(self) -> str:
        return record_hash(self.seq, self.at, self.request_id, self.event, self.payer, self.tool, self.data,
                           self.prev_hash)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "id": self.id, "at": self.at, "requestId": self.request_id, "event": self.event,
            "payer": self.payer, "tool": self.tool, "data": json.loads(self.data), "prevHash": self.prev_hash,
            "hash": self.hash,
        }


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
        if make_url(url).database in (None, "", ":memory:") and make_url(url).get_backend_name() == "sqlite":
            raise LedgerError("the audit trail needs a database file or server, not an in-memory SQLite")
        # Writers in this process queue here rather than on the database lock.
        self._lock = threading.Lock()
        try:
            self.engine = create_audit_engine(url)
            Base.metadata.create_all(self.engine, tables=AUDIT_TABLES)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
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
            with self._lock, self._sessions.begin() as session:
                head = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == HEAD_ID).with_for_update()
                first, prev = session.execute(head).one()
                seq = first
                rows: list[dict[str, Any]] = []
                for item in events:
                    seq += 1
                    at = item.at
                    if at.tzinfo is not UTC:
                        at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
                    data = canonical_json(clean_fields(item.fields))
                    digest = record_hash(seq, at, item.request_id, item.event, item.payer, item.tool, data, prev)
                    rows.append({
                        "seq": seq, "recorded_at": at, "request_id": item.request_id, "event": item.event,
                        "payer": item.payer, "tool": item.tool, "data": data, "prev_hash": prev, "hash": digest,
                    })
                    prev = digest
                # Core executemany, no RETURNING: an ORM object per record cost more than its hash.
                session.execute(insert(_RECORDS), rows)
                session.execute(
                    update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=seq, hash=prev, updated_at=utcnow())
                )
                return list(range(first + 1, seq + 1))
        except SQLAlchemyError as exc:
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
        after = (from_seq - 1) if from_seq is not None else None
        while True:
            query = select(AuditRecord).order_by(AuditRecord.seq).limit(page)
            if after is not None:
                query = query.where(AuditRecord.seq > after)
            if to_seq is not None:
                query = query.where(AuditRecord.seq <= to_seq)
            if since is not None:
                query = query.where(AuditRecord.recorded_at >= since)
            if until is not None:
                query = query.where(AuditRecord.recorded_at < until)
            with self._sessions() as session:
                rows = [StoredRecord.of(row) for row in session.scalars(query)]
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].seq

    def for_request(self, request_id: str) -> list[StoredRecord]:
        with self._sessions() as session:
            query = select(AuditRecord).where(AuditRecord.request_id == request_id).order_by(AuditRecord.seq)
            return [StoredRecord.of(row) for row in session.scalars(query)]

    def verify(self, anchor: tuple[int, str] | None = None) -> VerifyReport:
        return verify_chain(self.records(), head=self.head(), anchor=anchor)


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """Where the chain is broken and how: ``kind`` is a stable code."""

    kind: str  # hash_mismatch | prev_hash_mismatch | sequence_gap | sequence_out_of_order | inserted | head_mismatch | anchor_mismatch
    seq: int | None
    id: int | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "id": self.id, "detail": self.detail}


@dataclass
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.intact, "records": self.records, "firstSeq": self.first_seq, "lastSeq": self.last_seq,
            "lastHash": self.last_hash, "problems": [p.to_json() for p in self.problems],
        }


def _name(record: StoredRecord) -> str:
    return f"seq {record.seq}" + (f" (id {record.id})" if record.id is not None else "")


def verify_chain(
    records: Iterable[StoredRecord], *, head: tuple[int, str] | None = None, anchor: tuple[int, str] | None = None,
    start: tuple[int, str] | None = None,
) -> VerifyReport:
    """Walk records in ``seq`` order. Each is checked against its own content (hash), against the
    record before it (prev hash, seq + 1, row ids rising with seq), and the last against the head.
    Checks use the *stored* hash of the previous record, so one edit is one problem, not a cascade.
    ``start`` (seq, hash) is the record before the first one given (default: the genesis)."""
    report = VerifyReport()
    expected_seq, prev_hash = (start[0] + 1, start[1]) if start else (1, GENESIS_HASH)
    # Recent hashes by value: a prev hash pointing further back names the records in between.
    recent: dict[str, StoredRecord] = {}
    previous: StoredRecord | None = None
    previous_ok = True
    for record in records:
        report.records += 1
        if report.first_seq is None:
            report.first_seq = record.seq
        problems = report.problems
        before = len(problems)
        if record.computed_hash() != record.hash:
            problems.append(Problem("hash_mismatch", record.seq, record.id,
                                    f"{_name(record)}: its content does not match its hash (edited)"))
        if record.seq < expected_seq:
            problems.append(Problem("sequence_out_of_order", record.seq, record.id,
                                    f"{_name(record)} comes after seq {expected_seq - 1} (duplicate or reordered)"))
        elif record.seq > expected_seq:
            missing = f"{expected_seq}" if record.seq == expected_seq + 1 else f"{expected_seq}..{record.seq - 1}"
            problems.append(Problem("sequence_gap", record.seq, record.id,
                                    f"seq {missing} missing before {_name(record)} (deleted)"))
        elif record.prev_hash != prev_hash:
            skipped = recent.get(record.prev_hash)
            if skipped is not None and previous is not None and previous_ok:
                problems.append(Problem("inserted", previous.seq, previous.id,
                                        f"{_name(previous)} was inserted: {_name(record)} chains to {_name(skipped)}"))
            else:
                problems.append(Problem("prev_hash_mismatch", record.seq, record.id,
                                        f"{_name(record)} does not chain to the record before it"
                                        + (f" ({_name(previous)}: edited and re-hashed, or replaced)" if previous else "")))
        if previous is not None and record.id is not None and previous.id is not None and record.id < previous.id \
                and not any(p.kind == "inserted" and p.seq == previous.seq for p in problems):
            problems.append(Problem("sequence_out_of_order", previous.seq, previous.id,
                                    f"{_name(previous)} was written after {_name(record)} (row ids fall: inserted or reordered)"))
        if anchor is not None and record.seq == anchor[0] and record.hash != anchor[1]:
            problems.append(Problem("anchor_mismatch", record.seq, record.id,
                                    f"{_name(record)} has hash {record.hash}, the anchor says {anchor[1]}"))
        recent[record.hash] = record
        if len(recent) > 64:
            recent.pop(next(iter(recent)))
        previous, previous_ok = record, len(problems) == before
        expected_seq, prev_hash = record.seq + 1, record.hash
    report.last_seq = previous.seq if previous else (start[0] if start else 0)
    report.last_hash = previous.hash if previous else (start[1] if start else GENESIS_HASH)
    if head is not None and (report.last_seq, report.last_hash) != head:
        head_seq, head_hash = head
        if head_seq > report.last_seq:
            detail = f"the head is at seq {head_seq} but the chain ends at seq {report.last_seq} (records deleted at the end)"
        elif head_seq < report.last_seq:
            detail = f"the chain goes on past the head (seq {head_seq}) to seq {report.last_seq} (records appended outside the trail)"
        else:
            detail = f"seq {head_seq} has hash {report.last_hash} but the head says {head_hash}"
        report.problems.append(Problem("head_mismatch", head_seq, None, detail))
    if anchor is not None and anchor[0] > report.last_seq:
        report.problems.append(Problem("anchor_mismatch", anchor[0], None,
                                       f"the anchor names seq {anchor[0]} but the chain ends at seq {report.last_seq}"))
    return report


# --- the asyncio front ----------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where the pipeline hands each finished request's events; must not block or raise."""

    def submit(self, events: Sequence[AuditEvent]) -> None: ...

    async def close(self) -> None: ...


class AuditWriter:
    """A bounded queue and one writer task: the events of many requests per transaction.

    ``submit`` never blocks the loop and never drops: when the queue is full, events wait in a
    spill list the writer empties after the queue, still many per transaction (one transaction per
    request would make a writer that fell behind fall further behind). ``drain`` (from another
    thread) and ``flush`` (on the loop) wait until everything submitted so far is written or, after
    retries, logged as lost.
    """

    def __init__(self, trail: AuditTrail, *, max_queued: int = 10_000, max_batch: int = 500,
                 retries: int = 3, executor: Executor | None = None, linger_seconds: float = 0.01) -> None:
        self.trail = trail
        # How long the writer waits for more requests' events before a transaction: a transaction's
        # own cost (head row, commit) is several records', so one per request would cost more than
        # the records at low concurrency. Records are chained a few milliseconds later; none is lost.
        self.linger_seconds = linger_seconds
        # Where appends run: the ledger's thread when both share one SQLite file (no lock waits
        # between the two writers), else the loop's default pool.
        self._executor = executor
        self.max_batch = max_batch
        self.retries = retries
        self.written = 0
        self.failed = 0
        self._max_queued = max_queued
        self._queue: asyncio.Queue[list[AuditEvent]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spill: list[AuditEvent] = []  # on the loop's thread only, like the queue
        self._pending = 0
        self._idle = threading.Condition()

    def submit(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        batch = list(events)
        with self._idle:
            self._pending += len(batch)
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue(self._max_queued)
            self._task = loop.create_task(self._run(self._queue), name="audit-writer")
        if self._spill or self._queue.full():  # behind the queue, in order
            self._spill.extend(batch)
        else:
            self._queue.put_nowait(batch)

    async def _run(self, queue: asyncio.Queue[list[AuditEvent]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = []
            if not self._spill:
                batch = await queue.get()
                if self.linger_seconds > 0 and len(batch) * (1 + queue.qsize()) < self.max_batch:  # not a full batch yet
                    await asyncio.sleep(self.linger_seconds)
            while len(batch) < self.max_batch and not queue.empty():
                batch.extend(queue.get_nowait())
            if len(batch) < self.max_batch and self._spill:
                room = self.max_batch - len(batch)
                batch.extend(self._spill[:room])
                del self._spill[:room]
            await loop.run_in_executor(self._executor, self._write, batch)

    def _write(self, batch: list[AuditEvent]) -> None:
        written = False
        try:
            for attempt in range(self.retries + 1):
                try:
                    self.trail.append(batch)
                    written = True
                    return
                except Exception as exc:  # noqa: BLE001 - whatever broke, the records must not vanish silently
                    if attempt == self.retries or not isinstance(exc, LedgerError):
                        reason = exc.message if isinstance(exc, LedgerError) else type(exc).__name__
                        log.error("audit trail unavailable (%s): %d records follow, not chained", reason, len(batch))
                        for item in batch:
                            log.error("audit record not chained: %s", json.dumps({
                                "at": iso_utc(item.at), "requestId": item.request_id, "event": item.event,
                                "payer": item.payer, "tool": item.tool, "data": clean_fields(item.fields),
                            }, default=str, sort_keys=True))
                        return
                    threading.Event().wait(0.05 * 2**attempt)  # back off before the next attempt
        finally:
            with self._idle:
                if written:
                    self.written += len(batch)
                else:
                    self.failed += len(batch)
                self._pending -= len(batch)
                self._idle.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Block the calling thread (never the loop's) until all submitted records are handled."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    async def flush(self) -> None:
        if self._pending:
            await asyncio.to_thread(self.drain)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.trail.close()
