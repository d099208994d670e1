"""Verifying the hash chain: what ``x402gw audit verify`` and ``AuditTrail.verify`` run, on the
database's records or on an export's lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from settlement.audit.records import GENESIS_HASH, StoredRecord

__all__ = ["Problem", "VerifyReport", "verify_chain"]


@dataclass(frozen=True, slots=True)
class Problem:
    """Where the chain is broken and how: ``kind`` is a stable code."""

    # hash_mismatch | prev_hash_mismatch | sequence_gap | sequence_out_of_order | inserted | head_mismatch |
    # anchor_mismatch | unreadable (this module); ledger_mismatch | ledger_row_missing (settlement.audit.ledger_check)
    kind: str
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
    # Settled records compared with their payment rows (``ledger_check``); None: not compared.
    ledger_checked: int | None = None

    @property
    def intact(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.intact, "records": self.records, "firstSeq": self.first_seq, "lastSeq": self.last_seq,
            "lastHash": self.last_hash, "problems": [p.to_json() for p in self.problems],
            "ledgerChecked": self.ledger_checked,
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
    ``start`` (seq, hash) is the record before the first one given (default: the genesis).

    One loop of ~60 lines on purpose: every check reads the state the record before left
    (expected seq, previous hash, recent hashes), kept in one place so the checks cannot drift."""
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
        if record.unreadable is not None:
            # Its content cannot be hashed as written: named once; the chain goes on from its stored hash.
            seq = record.seq if record.seq >= 0 else None
            name = f"seq {seq}" if seq is not None else f"a record (id {record.id})"
            problems.append(Problem("unreadable", seq, record.id, f"{name}: {record.unreadable} (edited)"))
            previous, previous_ok = record, False
            expected_seq, prev_hash = (seq if seq is not None else expected_seq) + 1, record.hash
            continue
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
    _check_end(report, head, anchor)
    return report


def _check_end(report: VerifyReport, head: tuple[int, str] | None, anchor: tuple[int, str] | None) -> None:
    """Where the chain ended against the head row and the anchor."""
    assert report.last_seq is not None
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
