"""The start-up resolution of open payments loses a race gracefully (issue 20 item 2): with several
workers or replicas, another process may settle a row between this one's reading the chain and its
writing the answer. The later write stands; the older view is dropped, and start-up goes on (and so
does the background resolver's round: ``keep_resolving``)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from settlement.chain.receipts import Receipt
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.ledger.resolve import Resolution, apply_unless_moved, resolve_open_payments
from settlement.schema import open_ledger
from settlement.schemes.exact_resolve import resolve_exact
from tests.support.ledger_rows import force_row
from tests.support.settlement_helpers import ledger_fields

TX = "0x" + "cd" * 32
FRESH_TX = "0x" + "ef" * 32


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


class OvertakenResolver:
    """Says 'still pending' (what the chain said a moment ago) after another process settled the
    row; on a second row it tells the truth."""

    def __init__(self, ledger: Ledger, overtaken: int) -> None:
        self.ledger, self.overtaken = ledger, overtaken

    async def resolve(self, row: Payment) -> Resolution:
        after = PaymentState.PENDING.value
        if row.id == self.overtaken:
            self.ledger.mark_settled(row.id, tx_hash=TX, block_number=9)  # the other worker, meanwhile
        else:
            after = PaymentState.SETTLED.value
        return Resolution(row.id, row.request_id, row.state, after, TX, 9, "receipt_success")


def test_a_row_settled_meanwhile_by_another_process_is_left_settled(ledger: Ledger) -> None:
    first = ledger.record_verified(**ledger_fields(1)).id
    second = ledger.record_verified(**ledger_fields(2)).id
    for payment_id in (first, second):
        force_row(ledger, payment_id, state=PaymentState.SETTLING, tx_hash=TX)
    # a settled row cannot go back to pending: the older view is dropped, the next row still resolved
    resolved = asyncio.run(resolve_open_payments(ledger, OvertakenResolver(ledger, first)))
    assert [r.payment_id for r in resolved] == [second]
    states = {row.id: row.state for row in ledger.all()}
    assert states == {first: PaymentState.SETTLED, second: PaymentState.SETTLED}


class ReusedMeanwhile:
    """The chain as a remote facilitator's pending row without a hash sees it: the authorization
    unused, its validBefore past. While this process reads the chain, another one fails the row
    (``not_broadcast``) and the payer's fresh authorization under the same nonce (a later
    validBefore) reuses it: recorded, written ahead with its own transaction, broadcast."""

    def __init__(self, ledger: Ledger, fresh: dict[str, Any]) -> None:
        self.ledger, self.fresh = ledger, fresh

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        return None

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        [row] = self.ledger.open_payments()
        self.ledger.fail(row.id, "not_broadcast")  # the other worker's round
        reused = self.ledger.record_verified(**self.fresh)  # the payer's new authorization, same nonce
        assert reused.id == row.id and reused.state == PaymentState.VERIFIED
        self.ledger.begin_settlement(row.id, (200, [], b"{}"), tx_hash=FRESH_TX, request_id=self.fresh["request_id"])
        return False  # its transaction is not mined yet

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        return None


class RemoteRows:
    def __init__(self, chain: ReusedMeanwhile) -> None:
        self.chain = chain

    async def resolve(self, row: Payment) -> Resolution:
        return await resolve_exact(row, self.chain, write_ahead=False, clock=lambda: 2_000)  # type: ignore[arg-type]


def test_a_row_reused_by_a_fresh_payment_meanwhile_is_not_failed_from_the_old_view(ledger: Ledger) -> None:
    """The stale view (no hash, window over: ``failed``) used to be written on the new payment's
    ``settling`` row: its settlement then landed on a failed row (``mark_settled`` refused), money
    moved and the ledger said failed."""
    first = ledger.record_verified(**ledger_fields(1, valid_before=1_000)).id
    ledger.mark_pending(first, error_reason="facilitator_timeout")  # a remote facilitator: outcome unknown, no hash
    fresh = ledger_fields(1, request_id="req-fresh", valid_before=5_000)
    resolved = asyncio.run(resolve_open_payments(ledger, RemoteRows(ReusedMeanwhile(ledger, fresh))))
    row = ledger.get(first)
    assert row is not None
    assert row.state == PaymentState.SETTLING and row.tx_hash == FRESH_TX, row.error_reason
    assert resolved == []  # the old view dropped
    ledger.mark_settled(first, tx_hash=FRESH_TX, block_number=9)  # the fresh payment's receipt: recorded
    assert ledger.get(first).state == PaymentState.SETTLED  # type: ignore[union-attr]


def _probe(ledger: Ledger, payment_id: int) -> str:
    """Another process trying, without waiting, to take the row for a write: "taken", or why not."""
    if ledger.engine.dialect.name == "sqlite":
        other = sqlite3.connect(str(ledger.engine.url.database), timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.rollback()
            return "taken"
        except sqlite3.OperationalError as exc:
            return str(exc)
        finally:
            other.close()
    with ledger.engine.connect() as connection:
        try:
            connection.execute(text("SELECT state FROM payments WHERE id = :pid FOR UPDATE NOWAIT"), {"pid": payment_id})
            return "taken"
        except OperationalError as exc:
            return type(exc.orig).__name__


@pytest.mark.parametrize("backend", ["ledger", "pg_ledger"])
def test_no_write_lands_between_the_check_and_the_write(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``apply_unless_moved`` holds the row from its check to its write (called outside a group
    transaction, as a one-call group is): another process that tries to take the row between the two
    is refused. Before, on PostgreSQL its write could land there and be written over by this older
    view; on SQLite the check's read snapshot, grown stale by that write, failed the write
    ("database is locked": seen as a flaky ``x402gw reconcile`` beside a running gateway)."""
    ledger: Ledger = request.getfixturevalue(backend)
    row_id = ledger.record_verified(**ledger_fields(1)).id
    force_row(ledger, row_id, state=PaymentState.PENDING, tx_hash=TX)
    row = ledger.get(row_id)
    assert row is not None
    probes: list[str] = []
    read = ledger.get

    def read_then_probe(payment_id: int) -> Payment | None:
        current = read(payment_id)
        probes.append(_probe(ledger, payment_id))  # another process, right after the check
        return current

    monkeypatch.setattr(ledger, "get", read_then_probe)
    resolution = Resolution(row_id, row.request_id, row.state, PaymentState.SETTLED.value, TX, 9, "receipt_success")
    assert apply_unless_moved(ledger, row, resolution)
    assert probes == ["database is locked" if ledger.engine.dialect.name == "sqlite" else "LockNotAvailable"]
    monkeypatch.undo()
    assert ledger.get(row_id).state == PaymentState.SETTLED  # type: ignore[union-attr]
    assert _probe(ledger, row_id) == "taken"  # and let go
