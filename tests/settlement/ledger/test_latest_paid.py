"""``Ledger.latest_paid``, what a sign-in's re-access stands on, on both backends: only a settled
payment that moved money (an amount above 0 and the transaction that moved it) and owes nothing
back. An upto charge of 0 settles with neither and buys nothing again; a newer such row does not
hide an older real payment."""

from __future__ import annotations

import secrets
from typing import Any

from settlement.ledger import Ledger, PaymentState
from tests.settlement.ledger.test_ledger import PAYER, fields

FINGERPRINT = "f" * 64


def _settled(ledger: Ledger, *, amount: int, tx_hash: str | None, **changes: Any) -> int:
    row = ledger.record_verified(**fields(amount=amount, fingerprint=FINGERPRINT, **changes))
    ledger.begin_settlement(row.id, None)
    if tx_hash is None:
        ledger.mark_settled(row.id)  # what the pipeline does for an upto charge of 0: no transaction
    else:
        ledger.mark_settled(row.id, tx_hash=tx_hash, block_number=7)
    return row.id


def test_a_settlement_that_moved_no_money_opens_nothing(ledger: Ledger) -> None:
    free = _settled(ledger, amount=0, tx_hash=None)
    row = ledger.get(free)
    assert row is not None and (row.state, row.amount, row.tx_hash) == (PaymentState.SETTLED, 0, None)
    assert ledger.latest_paid(PAYER, "weather", FINGERPRINT) is None
    assert ledger.latest_paid(PAYER, "weather", None) is None  # match: tool neither


def test_an_amount_without_a_transaction_or_a_transaction_for_nothing_opens_nothing(ledger: Ledger) -> None:
    _settled(ledger, amount=10_000, tx_hash=None)
    _settled(ledger, amount=0, tx_hash="0x" + secrets.token_hex(32))
    assert ledger.latest_paid(PAYER, "weather", FINGERPRINT) is None
    assert ledger.latest_paid(PAYER, "weather", None) is None


def test_a_newer_free_row_does_not_hide_an_older_payment(ledger: Ledger) -> None:
    paid = _settled(ledger, amount=10_000, tx_hash="0x" + secrets.token_hex(32))
    _settled(ledger, amount=0, tx_hash=None)
    found = ledger.latest_paid(PAYER, "weather", FINGERPRINT)
    assert found is not None and found.id == paid and found.amount == 10_000 and found.tx_hash
    tool_wide = ledger.latest_paid(PAYER, "weather", None)
    assert tool_wide is not None and tool_wide.id == paid
    assert ledger.latest_paid(PAYER, "other_tool", None) is None
