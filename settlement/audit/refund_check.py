"""The records that name a refund, and what they allow: what ``ledger refunds --pay`` asks of each
owed refund before paying it, and what ``audit verify`` checks of them against the ledger.

The pipeline names each refund it owes (``refund_owed``: payment id, amount, reason, under the
payment's request id), a person each one it did not and they approved (``refund_approved``), and
every payer of a refund the payment (``refund_paid``: payment id, amount, transaction), written
before the ledger records it paid. A refund is paid only when:

- the trail names no ``refund_paid`` of the payment (``refund_already_paid``: a paid refund whose
  ``refunded_at`` was cleared by SQL owes nothing);
- the request's own ``response`` record, earlier than the record naming the refund, does not say the
  answer was delivered (status under 300 and outcome ``settled``: ``refund_contradicted``);
- a ``refund_owed`` or ``refund_approved`` record names it with the amount owed (``refund_unaudited``).

What this cannot catch: the trail has no secret, so records appended at its tail by someone with
the database (a ``refund_owed`` under a request whose ``response`` record was never written, say)
are consistent records; ``audit verify --anchor`` pins only what came before the anchor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.engine import Engine

from settlement.audit.chain import Problem, _name
from settlement.audit.records import AUDIT_TABLES, StoredRecord
from settlement.ledger.models import Payment

__all__ = ["REFUND_ALREADY_PAID", "REFUND_APPROVED", "REFUND_CONTRADICTED", "REFUND_OWED", "REFUND_PAID",
           "REFUND_UNAUDITED", "RefundCheck", "refund_recorded", "refund_refusal"]

REFUND_OWED, REFUND_PAID = "refund_owed", "refund_paid"
REFUND_APPROVED = "refund_approved"  # a person's approval of a refund the pipeline did not record (ledger refunds --approve)
REFUND_ALREADY_PAID, REFUND_CONTRADICTED, REFUND_UNAUDITED = "refund_already_paid", "refund_contradicted", "refund_unaudited"
_NAMING = (REFUND_OWED, REFUND_APPROVED)
_BATCH = 500  # ledger rows or requests read at once
_MAX_ID = 2**63 - 1  # a payment id outside 1.._MAX_ID names no row (and a BIGINT cannot hold it)


def _payment_id(record: StoredRecord) -> int | None:
    data = record.fields()
    value = data.get("paymentId") if data is not None else None
    return value if type(value) is int else None


def _delivered(record: StoredRecord) -> bool:
    """A ``response`` record saying its answer was given and paid for."""
    data = record.fields() if record.event == "response" else None
    status = data.get("status") if data is not None else None
    return type(status) is int and status < 300 and data is not None and data.get("outcome") == "settled"


def _contradicted(records: list[StoredRecord], naming: StoredRecord) -> bool:
    """Whether a ``response`` record of the same request, before ``naming``, says the answer was delivered."""
    return any(r.seq < naming.seq and _delivered(r) for r in records)


def refund_recorded(records: Iterable[StoredRecord], row: Payment) -> bool:
    """Whether one of ``records`` (the row's request's) is the pipeline's ``refund_owed`` record of
    this row's refund, or a person's ``refund_approved`` of it: its payment id and the amount owed."""
    for record in records:
        data = record.fields() if record.event in _NAMING else None
        if data is not None and data.get("paymentId") == row.id and str(data.get("amount")) == str(row.refund_owed):
            return True
    return False


def refund_refusal(records: Iterable[StoredRecord], row: Payment) -> str | None:
    """Why ``row``'s owed refund must not be paid, by the trail (``records``: its request's, in
    chain order): one of the module's codes, or None when the trail names it and nothing refuses it."""
    records = list(records)
    if any(r.event == REFUND_PAID and _payment_id(r) == row.id for r in records):
        return REFUND_ALREADY_PAID
    naming = [r for r in records if r.event in _NAMING and _payment_id(r) == row.id]
    if any(_contradicted(records, r) for r in naming):
        return REFUND_CONTRADICTED
    return None if refund_recorded(naming, row) else REFUND_UNAUDITED


class RefundCheck:
    """``audit verify``'s part for refunds: during the walk it keeps the (few) records naming or
    paying a refund; after it, names each ``refund_paid`` payment whose row owes the refund again
    (``refund_reopened``) and each refund named under a request whose earlier ``response`` record
    says the answer was delivered (``refund_contradicted``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.problems: list[Problem] = []
        self._paid: dict[int, StoredRecord] = {}
        self._naming: list[StoredRecord] = []

    def see(self, record: StoredRecord) -> None:
        if record.event == REFUND_PAID and (payment_id := _payment_id(record)) is not None and 1 <= payment_id <= _MAX_ID:
            self._paid.setdefault(payment_id, record)
        elif record.event in _NAMING:
            self._naming.append(record)

    def finish(self) -> None:
        self._reopened()
        self._contradictions()

    def _reopened(self) -> None:
        table = Payment.__table__
        ids = sorted(self._paid)
        for start in range(0, len(ids), _BATCH):
            query = select(table.c.id).where(and_(table.c.id.in_(ids[start:start + _BATCH]),
                                                  table.c.refund_owed.is_not(None), table.c.refunded_at.is_(None)))
            with self.engine.connect() as connection:
                owing = sorted(row.id for row in connection.execute(query))
            for payment_id in owing:
                record = self._paid[payment_id]
                self.problems.append(Problem("refund_reopened", record.seq, record.id,
                                             f"{_name(record)} paid the refund of payment {payment_id}; its ledger row "
                                             "owes it again (refunded_at cleared)"))

    def _contradictions(self) -> None:
        records = _RecordsByRequest(self.engine, {r.request_id for r in self._naming})
        for naming in self._naming:
            if _contradicted(records.of(naming.request_id), naming):
                self.problems.append(Problem(REFUND_CONTRADICTED, naming.seq, naming.id,
                                             f"{_name(naming)} names a refund ({naming.event}) of request "
                                             f"{naming.request_id}, whose answer its response record says was delivered"))


class _RecordsByRequest:
    """The ``response`` records of some requests, read 500 requests at a time (indexed by request id)."""

    def __init__(self, engine: Engine, request_ids: set[str]) -> None:
        records = AUDIT_TABLES[0].c
        self._by_request: dict[str, list[StoredRecord]] = {}
        ids = sorted(request_ids)
        for start in range(0, len(ids), _BATCH):
            query = select(records.id, records.seq, records.request_id, records.event, records.data).where(
                and_(records.request_id.in_(ids[start:start + _BATCH]), records.event == "response"))
            with engine.connect() as connection:
                for row in connection.execute(query):
                    if type(row.seq) is int:
                        self._by_request.setdefault(str(row.request_id), []).append(_response(row))

    def of(self, request_id: str) -> list[StoredRecord]:
        return self._by_request.get(request_id, [])


def _response(row: Any) -> StoredRecord:
    return StoredRecord(row.id, row.seq, "", str(row.request_id), str(row.event), None, None, str(row.data), "", "")
