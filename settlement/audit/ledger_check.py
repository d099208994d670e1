"""The audit trail against the ledger: each ``settled`` record against its payment row, and the
records that name a refund (what ``audit verify``, ``ledger refunds --pay`` and receipts ask).

Why in ``audit verify`` (by default, on a database) rather than in ``reconcile``: the trail shares
the ledger's database and verify already reads every record in chain order, so comparing each
``settled`` record with its row costs one indexed read per 500 of them and no chain access; it checks
every payment ever audited, not one block range; and it runs where the hash chain is checked, so a
row edited to agree with an edited record is named too (the record's own hash). Reconcile compares
the ledger with the chain, which knows nothing of tools, owners or paths.

A ``settled`` record carries the row's facts as the request had them in memory when it settled
(``gateway.pipeline.stages.settle.settled``): tool, owner, payer, payTo, amount (atomic, a decimal
string), asset, network, nonce and transaction. A row that disagrees is ``ledger_mismatch``; one that
is gone, ``ledger_row_missing``. Records written before these facts (transaction and network only)
are checked for what they carry. Addresses, nonces and hashes compare case-insensitively.

Not checked here: a settled row with no ``settled`` record (one settled by a resolver after its
request answered 503 has none, and an insider's inserted copy is named by reconcile,
``duplicate_in_ledger``), and receipts and refunds ask ``settled_record`` / ``refund_recorded``
per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine

from settlement.audit.chain import Problem
from settlement.audit.records import StoredRecord
from settlement.ledger.models import Payment, PaymentState

__all__ = ["REFUND_APPROVED", "REFUND_OWED", "SETTLED", "LedgerCheck", "refund_recorded", "settled_disagreement",
           "settled_record"]

SETTLED, REFUND_OWED = "settled", "refund_owed"
REFUND_APPROVED = "refund_approved"  # a person's approval of a refund the pipeline did not record (ledger refunds --approve)
# A settled record's field → the payment row's attribute, and whether it compares case-insensitively.
_FACTS = {"tool": ("tool", False), "owner": ("owner", False), "payer": ("payer", True), "payTo": ("pay_to", True),
          "amount": ("amount", False), "asset": ("asset", True), "network": ("network", False),
          "nonce": ("nonce", True)}
_BATCH = 500


def _same(recorded: Any, stored: Any, fold: bool) -> bool:
    if fold and isinstance(recorded, str) and isinstance(stored, str):
        return recorded.lower() == stored.lower()
    return str(recorded) == str(stored)


def settled_disagreement(data: dict[str, Any], row: Any) -> list[str]:
    """What ``row`` (a ``Payment``, or a row of its table) says otherwise than its ``settled`` record's
    ``data``: ``field: record -> row``."""
    found = []
    for key, (attribute, fold) in _FACTS.items():
        if key in data and not _same(data[key], getattr(row, attribute), fold):
            found.append(f"{key}: {data[key]} -> {getattr(row, attribute)}")
    transaction = data.get("transaction")
    if transaction:  # "" : nothing moved (an upto charge of 0) or a voucher accrued, claimed later
        if row.state != PaymentState.SETTLED.value:
            found.append(f"state: settled -> {row.state}")
        if not _same(transaction, row.tx_hash, True):
            found.append(f"transaction: {transaction} -> {row.tx_hash}")
    return found


def settled_record(records: Iterable[StoredRecord], row: Payment) -> bool:
    """Whether one of ``records`` (the row's request's) is the ``settled`` record of this very row:
    its payment id, and no fact it carries (its transaction among them) disagreeing."""
    for record in records:
        data = record.fields() if record.event == SETTLED else None
        # A transaction of "" (a voucher accrued, claimed later; an upto charge of 0) names none: the
        # other facts still have to agree.
        if data is not None and data.get("paymentId") == row.id and isinstance(data.get("transaction"), str) \
                and not settled_disagreement(data, row):
            return True
    return False


def refund_recorded(records: Iterable[StoredRecord], row: Payment) -> bool:
    """Whether one of ``records`` (the row's request's) is the pipeline's ``refund_owed`` record of
    this row's refund, or a person's ``refund_approved`` of it: its payment id and the amount owed."""
    for record in records:
        data = record.fields() if record.event in (REFUND_OWED, REFUND_APPROVED) else None
        if data is not None and data.get("paymentId") == row.id and str(data.get("amount")) == str(row.refund_owed):
            return True
    return False


class LedgerCheck:
    """Watches records go by (``watch``) and compares each ``settled`` one with its payment row, 500
    rows per read; ``problems`` after the walk. A database without the ledger's table: ``checked``
    stays None (an audit trail of its own)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.problems: list[Problem] = []
        self.checked: int | None = 0 if inspect(engine).has_table(Payment.__tablename__) else None
        self._waiting: list[tuple[StoredRecord, dict[str, Any], int]] = []

    def watch(self, records: Iterable[StoredRecord]) -> Iterator[StoredRecord]:
        for record in records:
            yield record
            if self.checked is None or record.event != SETTLED or record.unreadable is not None:
                continue
            data = record.fields()  # data that is not JSON is named by the chain (hash_mismatch)
            payment_id = data.get("paymentId") if data is not None else None
            if data is None or type(payment_id) is not int:
                continue
            self._waiting.append((record, data, payment_id))
            if len(self._waiting) >= _BATCH:
                self._compare()
        if self.checked is not None:
            self._compare()

    def _compare(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        ids = sorted({payment_id for _, _, payment_id in waiting})
        with self.engine.connect() as connection:
            rows = {row.id: row for row in connection.execute(select(Payment.__table__).where(Payment.__table__.c.id.in_(ids)))}
        for record, data, payment_id in waiting:
            assert self.checked is not None
            self.checked += 1
            name = f"seq {record.seq}" + (f" (id {record.id})" if record.id is not None else "")
            row = rows.get(payment_id)
            if row is None:
                self.problems.append(Problem("ledger_row_missing", record.seq, record.id,
                                             f"{name} settled payment {payment_id}; the ledger has no such payment"))
                continue
            wrong = settled_disagreement(data, row)  # a Row reads like a Payment
            if record.tool is not None and "tool" not in data and record.tool != row.tool:
                wrong.append(f"tool: {record.tool} -> {row.tool}")
            if wrong:
                self.problems.append(Problem("ledger_mismatch", record.seq, record.id,
                                             f"{name} settled payment {payment_id}; its ledger row says otherwise "
                                             f"(record -> ledger): {'; '.join(wrong)}"))
