"""A failure's reason may come from outside (a remote facilitator's ``errorReason``): one longer than
the column is cut to fit, on both backends, so the row still records the failure (PostgreSQL would
refuse the whole write, leaving the row where it was)."""

from __future__ import annotations

from settlement.ledger import Ledger, PaymentState
from settlement.ledger.models import REASON_LENGTH
from tests.settlement.ledger.test_ledger import fields


def test_a_reason_longer_than_its_column_is_cut_to_fit(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())
    ledger.begin_settlement(row.id, None)
    reason = "facilitator_says_" + "x" * 400
    ledger.fail(row.id, reason)
    failed = ledger.get(row.id)
    assert failed is not None and failed.state == PaymentState.FAILED
    assert failed.error_reason == reason[:REASON_LENGTH]
