"""The start-up resolution of open payments loses a race gracefully (issue 20 item 2): with several
workers or replicas, another process may settle a row between this one's reading the chain and its
writing the answer. The later write stands; the older view is dropped, and start-up goes on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from settlement.ledger import Ledger, Payment, PaymentState
from settlement.ledger.resolve import Resolution, resolve_open_payments
from settlement.schema import open_ledger
from tests.support.ledger_rows import force_row
from tests.support.settlement_helpers import ledger_fields

TX = "0x" + "cd" * 32


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
