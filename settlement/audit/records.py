"""The audit trail's tables and record types: an event before it is chained (``AuditEvent``) and a
record as stored or exported (``StoredRecord``, whose ``to_json``/``from_json`` are the export format).

The tables share the ledger's metadata (one database, one set of migrations in ``settlement.schema``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from settlement.audit.canonical import canonical_json, iso_utc, record_hash
from settlement.ledger.models import Base, utcnow

__all__ = [
    "AUDIT_TABLES",
    "GENESIS_HASH",
    "HEAD_ID",
    "AuditEvent",
    "AuditHead",
    "AuditRecord",
    "StoredRecord",
]

GENESIS_HASH = "0" * 64
HEAD_ID = 1

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


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as read back (or as read from an export): what ``verify`` checks.

    ``unreadable`` says why a record could not be read as written (a time that is not a time, a
    sequence number that is not a number: SQLite keeps whatever text an UPDATE writes): verify names
    it (``unreadable``) and export writes what is stored, never a traceback."""

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
    unreadable: str | None = None

    @classmethod
    def of_values(cls, id: Any, seq: Any, at: Any, *texts: Any) -> StoredRecord:
        """A record from its columns as the database returned them, whatever an edit left there."""
        why: list[str] = []
        if type(seq) is not int:
            why.append(f"its sequence number {str(seq)[:40]!r} is not a number")
            seq = -1
        if isinstance(at, datetime):
            at_text = iso_utc(at)
        else:
            try:
                at_text = iso_utc(datetime.fromisoformat(at))
            except (TypeError, ValueError):
                why.append(f"its time {str(at)[:40]!r} is not a time")
                at_text = str(at)
        request_id, event, payer, tool, data, prev_hash, digest = texts
        if not all(isinstance(t, str) for t in (request_id, event, data, prev_hash, digest)) or not all(
                t is None or isinstance(t, str) for t in (payer, tool)):
            why.append("a column holds what is not text")
        return cls(id, seq, at_text, str(request_id), str(event), _text(payer), _text(tool), str(data), str(prev_hash),
                   str(digest), "; ".join(why) or None)

    @classmethod
    def from_json(cls, line: str) -> StoredRecord:
        item = json.loads(line)
        # ``dataText``: the stored data was not a JSON object (an edit); exported as the text it is.
        data = item["data"] if item.get("dataText") is True else canonical_json(item["data"])
        if not isinstance(data, str):
            raise TypeError("dataText without text")
        return cls(item.get("id"), item["seq"], item["at"], item["requestId"], item["event"], item.get("payer"),
                   item.get("tool"), data, item["prevHash"], item["hash"], item.get("unreadable"))

    def computed_hash(self) -> str:
        return record_hash(self.seq, self.at, self.request_id, self.event, self.payer, self.tool, self.data,
                           self.prev_hash)

    def fields(self) -> dict[str, Any] | None:
        """The event's fields, or None when the stored data is not a JSON object (an edit); JSON nested
        deeper than the parser's recursion limit (an edit too) is not JSON here either."""
        try:
            value = json.loads(self.data)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    def to_json(self) -> dict[str, Any]:
        fields = self.fields()
        if fields is not None and canonical_json(fields) != self.data:
            fields = None  # JSON, but not the text that was hashed: kept as that text
        item = {
            "seq": self.seq, "id": self.id, "at": self.at, "requestId": self.request_id, "event": self.event,
            "payer": self.payer, "tool": self.tool, "data": self.data if fields is None else fields,
            "prevHash": self.prev_hash, "hash": self.hash,
        }
        if fields is None:
            item["dataText"] = True  # hashed as stored: `audit verify --file` names the record as the database does
        if self.unreadable is not None:
            item["unreadable"] = self.unreadable
        return item
