"""The webhook outbox: events written in the same database transaction as the state change they
report, and delivered at least once afterwards by a dispatcher (``gateway.ops.webhooks``).

A row is one event for one endpoint. Its ``event_id`` is the idempotency key the receiver sees
(the same for every endpoint and every attempt of that event). ``status``::

    pending ──delivered (2xx)──▶ delivered
    pending ──attempt failed──▶ pending (attempts + 1, next_attempt_at later) ... ──▶ dead (max attempts)
    delivered | dead ──replay──▶ pending (same event id)

A dispatcher claims a row with one guarded UPDATE (``lease_owner``, ``lease_until``): only a row
that is due and not leased, or whose lease ran out, is claimed, so two replicas never both deliver
it while a lease holds (SQLite and PostgreSQL alike). A process killed mid-delivery leaves a lease
that runs out; the row is then delivered again (at least once, same event id).

Events from the ledger's transitions (``EVENT_OF``) are written by ``settlement.ledger.payments``
through ``emit_payment_event``; others (breaker opened, budget exhausted) through ``emit``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.orm import Mapped, mapped_column

from settlement.ledger.models import Base, utcnow

__all__ = [
    "EVENTS",
    "EVENT_OF",
    "OutboxRow",
    "Subscriptions",
    "claim",
    "due",
    "emit",
    "emit_payment_event",
    "finish",
    "list_rows",
    "replay",
]

EVENTS = (
    "payment.settled", "payment.failed", "payment.pending", "refund.owed", "refund.paid",
    "breaker.opened", "budget.exhausted",
)
# Ledger transition → the event it emits (a state transition only when the state changed).
EVENT_OF = {
    "mark_settled": "payment.settled", "fail": "payment.failed", "mark_pending": "payment.pending",
    "record_refund_owed": "refund.owed", "record_refund_paid": "refund.paid",
}
# owner, event type → the names of the endpoints subscribed (none: nothing is written).
Subscriptions = Callable[[str, str], Sequence[str]]


class OutboxRow(Base):
    __tablename__ = "webhook_outbox"
    __table_args__ = (UniqueConstraint("event_id", "endpoint", name="uq_webhook_outbox_event_endpoint"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64), index=True)
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, exactly as signed and sent
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)  # the receiver's HTTP status
    last_error: Mapped[str | None] = mapped_column(String(128), default=None)  # a code, never a body
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


_OUTBOX: Table = OutboxRow.__table__  # type: ignore[assignment]  # declarative tables are Tables
_INSERT = insert(_OUTBOX)


def emit(connection: Connection, subscriptions: Subscriptions, owner: str, event_type: str, data: dict[str, Any],
         now: datetime | None = None) -> str | None:
    """One row per subscribed endpoint, in the caller's transaction; the event id, or None when no
    endpoint wants it."""
    endpoints = list(subscriptions(owner, event_type))
    if not endpoints:
        return None
    now = now or utcnow()
    event_id = f"evt_{uuid.uuid4().hex}"
    body = json.dumps({"id": event_id, "type": event_type, "createdAt": now.isoformat().replace("+00:00", "Z"),
                       "owner": owner, "data": data}, separators=(",", ":"), sort_keys=True)
    connection.execute(_INSERT, [
        {"event_id": event_id, "endpoint": name, "owner": owner, "event_type": event_type, "payload": body,
         "created_at": now, "status": "pending", "attempts": 0, "next_attempt_at": now}
        for name in endpoints
    ])
    return event_id


def emit_payment_event(connection: Connection, subscriptions: Subscriptions, transition: str, row: RowMapping) -> None:
    """The event of a ledger transition, from the payment row as the transition left it."""
    event_type = EVENT_OF[transition]

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    emit(connection, subscriptions, row["owner"], event_type, {
        "paymentId": row["id"], "requestId": row["request_id"], "tool": row["tool"], "payer": row["payer"],
        "payTo": row["pay_to"], "amount": text(row["amount"]), "decimals": row["decimals"], "asset": row["asset"],
        "network": row["network"], "state": row["state"], "transaction": row["tx_hash"],
        "blockNumber": row["block_number"], "reason": row["error_reason"], "refundOwed": text(row["refund_owed"]),
        "refundTransaction": row["refund_tx"],
    })


def claim(connection: Connection, row_id: int, owner: str, now: datetime, lease: timedelta) -> bool:
    """Take the lease on one row if it is due and nobody holds a live lease on it."""
    c = _OUTBOX.c
    result = connection.execute(
        update(_OUTBOX)
        .where(c.id == row_id, c.status == "pending", c.next_attempt_at <= now,
               or_(c.lease_until.is_(None), c.lease_until <= now))
        .values(lease_owner=owner, lease_until=now + lease)
    )
    return result.rowcount == 1


def due(connection: Connection, now: datetime, limit: int) -> list[RowMapping]:
    c = _OUTBOX.c
    return list(connection.execute(
        select(_OUTBOX).where(c.status == "pending", c.next_attempt_at <= now,
                              or_(c.lease_until.is_(None), c.lease_until <= now))
        .order_by(c.next_attempt_at, c.id).limit(limit)
    ).mappings())


def finish(connection: Connection, row_id: int, owner: str, *, delivered: bool, now: datetime,
           next_attempt_at: datetime | None, status_code: int | None, error: str | None) -> bool:
    """Record one attempt under this owner's lease: delivered, retried at ``next_attempt_at``, or dead
    (``next_attempt_at`` None). False when the lease was lost (another process took the row)."""
    c = _OUTBOX.c
    values: dict[str, Any] = {"attempts": c.attempts + 1, "lease_owner": None, "lease_until": None,
                              "last_status": status_code, "last_error": error}
    if delivered:
        values.update(status="delivered", delivered_at=now)
    elif next_attempt_at is None:
        values.update(status="dead")
    else:
        values.update(next_attempt_at=next_attempt_at)
    result = connection.execute(update(_OUTBOX).where(and_(c.id == row_id, c.lease_owner == owner)).values(**values))
    return result.rowcount == 1


def replay(connection: Connection, row_id: int, now: datetime) -> bool:
    """Deliver a row again (same event id, same body), now; False when there is no such row."""
    c = _OUTBOX.c
    result = connection.execute(
        update(_OUTBOX).where(c.id == row_id)
        .values(status="pending", next_attempt_at=now, lease_owner=None, lease_until=None)
    )
    return result.rowcount == 1


def list_rows(connection: Connection, *, status: str | None = None, limit: int = 100) -> list[RowMapping]:
    c = _OUTBOX.c
    query = select(_OUTBOX).order_by(c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(c.status == status)
    return list(connection.execute(query).mappings())
