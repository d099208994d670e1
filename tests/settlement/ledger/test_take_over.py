"""A ``verified`` row left by a request that died is taken over by the request that now holds the
payment's lock; from then on only that request may begin its settlement (the guard is part of the
write-ahead UPDATE itself), on both backends."""

from __future__ import annotations

import pytest

from settlement.errors import LedgerError
from settlement.ledger import Ledger, PaymentState
from tests.settlement.ledger.test_ledger import fields


def test_only_the_request_owning_a_row_begins_its_settlement(ledger: Ledger) -> None:
    first = fields(request_id="dead-request", path="/weather?city=Lisbon")
    row = ledger.record_verified(**first)
    successor = {**first, "request_id": "live-request", "path": "/weather?city=Porto"}

    assert ledger.take_over(row.id, "dead-request", successor)
    assert not ledger.take_over(row.id, "dead-request", first)  # once: it names its successor now
    taken = ledger.get(row.id)
    assert taken is not None and (taken.request_id, taken.path) == ("live-request", "/weather?city=Porto")

    with pytest.raises(LedgerError, match="taken by another request") as refused:
        ledger.begin_settlement(row.id, (200, [], b"dead"), request_id="dead-request")
    assert refused.value.code == "invalid_transition"
    still = ledger.get(row.id)
    assert still is not None and still.state == PaymentState.VERIFIED and ledger.stored_response(row.id) is None

    ledger.begin_settlement(row.id, (200, [], b"live"), request_id="live-request")
    settling = ledger.get(row.id)
    assert settling is not None and settling.state == PaymentState.SETTLING
    assert ledger.stored_response(row.id) == (200, [], b"live")


def test_a_settling_row_is_neither_taken_over_nor_settled_again_by_another_request(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields(request_id="first"))
    ledger.begin_settlement(row.id, None, request_id="first")
    assert not ledger.take_over(row.id, "first", fields(request_id="second"))
    # settling → settling is a transition the first request may repeat (a re-signed batch), not another's
    with pytest.raises(LedgerError, match="taken by another request"):
        ledger.begin_settlement(row.id, None, request_id="second")
    ledger.begin_settlement(row.id, None, tx_hash="0x" + "ab" * 32, request_id="first")
    again = ledger.get(row.id)
    assert again is not None and (again.request_id, again.tx_hash) == ("first", "0x" + "ab" * 32)


def test_a_refund_is_owed_once_so_only_one_request_pays_it(ledger: Ledger) -> None:
    """Two requests for one payment whose locks were lost both find its upstream failed: only the
    first records the refund (and goes on to pay it); the second is told it is owed already."""
    row = ledger.record_verified(**fields())
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id, tx_hash="0x" + "cd" * 32, block_number=3)
    assert ledger.record_refund_owed(row.id, 1000, "upstream_error") is True
    assert ledger.record_refund_owed(row.id, 1000, "answer_lost") is False
    owed = ledger.get(row.id)
    assert owed is not None and (owed.refund_owed, owed.refund_reason) == (1000, "upstream_error")
    unsettled = ledger.record_verified(**fields())
    with pytest.raises(LedgerError) as refused:  # not settled: refused as before, not "owed already"
        ledger.record_refund_owed(unsettled.id, 1000, "upstream_error")
    assert refused.value.code == "invalid_transition"
