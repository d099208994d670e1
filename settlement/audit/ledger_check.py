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

Since the eighth round the record carries method, path and fingerprint too (every field a receipt
signs that the row holds, besides its request id, by which the record is found, and the row's
creation time, block and signed maximum, which the chain or the signed authorization bear out). A
paymentId outside 1..2**63-1 is ``ledger_row_missing`` (never read: a BIGINT cannot hold it).
Records of refunds are checked by ``settlement.audit.refund_check`` (``refund_reopened``,
``refund_contradicted``).

Not checked here: a settled row with no ``settled`` record (one settled by a resolver after its
request answered 503 has none, and an insider's inserted copy is named by reconcile,
``duplicate_in_ledger``), and receipts and refunds ask ``settled_facts`` / ``refund_refusal``
per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from settlement.audit.chain import Problem, _name
from settlement.audit.records import StoredRecord
from settlement.audit.refund_check import _BATCH, _MAX_ID, RefundCheck
from settlement.ledger.models import Payment, PaymentState

__all__ = ["SETTLED", "LedgerCheck", "settled_disagreement", "settled_facts"]

SETTLED = "settled"
# A settled record's field → the payment row's attribute, and whether it compares case-insensitively:
# every field a receipt signs that the row holds and the request had in memory when it settled.
_FACTS = {"tool": ("tool", False), "owner": ("owner", False), "payer": ("payer", True), "payTo": ("pay_to", True),
          "amount": ("amount", False), "asset": ("asset", True), "network": ("network", False),
          "nonce": ("nonce", True), "method": ("method", False), "path": ("path", False),
          "fingerprint": ("fingerprint", True)}


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


def settled_facts(records: Iterable[StoredRecord], row: Payment) -> bool | None:
    """What ``records`` (the row's request's) say of this very row's settlement: None when none is
    its ``settled`` record (its payment id); else whether every one that is agrees with the row, no
    fact it carries (its transaction among them) disagreeing. A record that disagrees is never
    outweighed by another that agrees: the row was edited, or the trail was."""
    found = False
    for record in records:
        data = record.fields() if record.event == SETTLED else None
        if data is None or data.get("paymentId") != row.id:
            continue
        found = True
        # A transaction of "" (a voucher accrued, claimed later; an upto charge of 0) names none: the
        # other facts still have to agree.
        if not isinstance(data.get("transaction"), str) or settled_disagreement(data, row):
            return False
    return True if found else None


class LedgerCheck:
    """Watches records go by (``watch``) and compares each ``settled`` one with its payment row, 500
    rows per read, and the records of refunds (``RefundCheck``); ``problems`` after the walk. A
    database without the ledger's table: ``checked`` stays None (an audit trail of its own). The
    ledger failing to answer is one problem (``ledger_unreadable``) and ends the comparison, never
    the walk: the chain's own problems are still named."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.problems: list[Problem] = []
        self.checked: int | None = 0 if inspect(engine).has_table(Payment.__tablename__) else None
        self.refunds = RefundCheck(engine)
        self._waiting: list[tuple[StoredRecord, dict[str, Any], int]] = []
        self._failed = False

    def watch(self, records: Iterable[StoredRecord]) -> Iterator[StoredRecord]:
        for record in records:
            yield record
            if self.checked is None or self._failed or record.unreadable is not None:
                continue
            if record.event != SETTLED:
                self.refunds.see(record)
                continue
            data = record.fields()  # data that is not JSON is named by the chain (hash_mismatch)
            payment_id = data.get("paymentId") if data is not None else None
            if data is None or type(payment_id) is not int:
                continue
            if not 1 <= payment_id <= _MAX_ID:  # no row has it; the database would refuse the read
                self.checked += 1
                self._missing(record, payment_id)
                continue
            self._waiting.append((record, data, payment_id))
            if len(self._waiting) >= _BATCH:
                self._guarded(self._compare)
        if self.checked is not None:
            self._guarded(self._compare)
            self._guarded(self.refunds.finish)
            self.problems.extend(self.refunds.problems)

    def _guarded(self, step: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            step()
        except SQLAlchemyError as exc:
            self._failed = True
            self.problems.append(Problem("ledger_unreadable", -1, None,
                                         f"the ledger could not be compared with the trail ({type(exc).__name__}); "
                                         "the chain was walked to its end"))

    def _missing(self, record: StoredRecord, payment_id: object) -> None:
        self.problems.append(Problem("ledger_row_missing", record.seq, record.id,
                                     f"{_name(record)} settled payment {payment_id}; the ledger has no such payment"))

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
            row = rows.get(payment_id)
            if row is None:
                self._missing(record, payment_id)
                continue
            wrong = settled_disagreement(data, row)  # a Row reads like a Payment
            if record.tool is not None and "tool" not in data and record.tool != row.tool:
                wrong.append(f"tool: {record.tool} -> {row.tool}")
            if record.request_id != row.request_id:  # a receipt signs it: the record is read by it
                wrong.append(f"requestId: {record.request_id} -> {row.request_id}")
            if wrong:
                self.problems.append(Problem("ledger_mismatch", record.seq, record.id,
                                             f"{_name(record)} settled payment {payment_id}; its ledger row says otherwise "
                                             f"(record -> ledger): {'; '.join(wrong)}"))
