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
