"""A refund is claimed by one payer at a time before its broadcast, released only by its claimant,
recorded paid once, and listed while owed; on both backends. The guard is the UPDATE itself: a claim
made from a stale read of the row is refused, whatever the interleaving."""

from __future__ import annotations

import asyncio
import json

from settlement.ledger import Ledger, Payment
from settlement.ledger.outbox import list_rows
from tests.settlement.ledger.test_ledger import fields

TX_A, TX_B, TX_C = ("0x" + c * 64 for c in "abc")


def _owed(ledger: Ledger, amount: int = 1000) -> Payment:
    row = ledger.record_verified(**fields())
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id, tx_hash="0x" + "cd" * 32, block_number=3)
    assert ledger.record_refund_owed(row.id, amount, "upstream_error")
    return row


def _refund_tx(ledger: Ledger, payment_id: int) -> str | None:
    row = ledger.get(payment_id)
    assert row is not None
    return row.refund_tx


def test_one_claim_wins_from_the_same_read(ledger: Ledger) -> None:
    row = _owed(ledger)
    assert ledger.record_refund_tx(row.id, TX_A) is True
    assert ledger.record_refund_tx(row.id, TX_B) is False  # read "none yet" too: stale
    assert _refund_tx(ledger, row.id) == TX_A
    assert ledger.record_refund_tx(row.id, TX_B, previous=TX_C) is False  # not what the row holds
    assert ledger.record_refund_tx(row.id, TX_B, previous=TX_A) is True  # replaces the one it read
    assert _refund_tx(ledger, row.id) == TX_B


def test_racing_claims_through_the_ledger_threads_leave_one_winner(ledger: Ledger) -> None:
    row = _owed(ledger)

    async def race() -> list[bool]:
        return list(await asyncio.gather(*(ledger.run(ledger.record_refund_tx, row.id, "0x" + f"{i:064x}")
                                           for i in range(8))))

    won = asyncio.run(race())
    assert won.count(True) == 1
    assert _refund_tx(ledger, row.id) == "0x" + f"{won.index(True):064x}"


def test_a_refused_broadcast_is_released_by_its_claimant_only(ledger: Ledger) -> None:
    row = _owed(ledger)
    assert ledger.record_refund_tx(row.id, TX_A)
    assert ledger.record_refund_tx(row.id, None, previous=TX_B) is False  # not the claimant's hash
    assert ledger.record_refund_tx(row.id, None, previous=TX_A) is True
    assert _refund_tx(ledger, row.id) is None
    assert ledger.record_refund_tx(row.id, TX_C) is True  # unpaid again: claimable afresh


def test_paid_once_and_never_claimed_after(ledger: Ledger) -> None:
    row = _owed(ledger)
    other = _owed(ledger, 2000)
    assert [r.id for r in ledger.owed_refunds()] == [row.id, other.id]
    assert ledger.record_refund_tx(row.id, TX_A)
    assert ledger.record_refund_paid(row.id, TX_A) is True
    assert ledger.record_refund_paid(row.id, TX_B) is False  # once: the first record stands
    paid = ledger.get(row.id)
    assert paid is not None and paid.refund_tx == TX_A and paid.refunded_at is not None
    assert ledger.record_refund_tx(row.id, TX_B, previous=TX_A) is False  # a paid refund is never claimed again
    assert [r.id for r in ledger.owed_refunds()] == [other.id]


def test_a_payment_owing_nothing_is_not_listed(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id, tx_hash="0x" + "cd" * 32, block_number=3)
    assert ledger.owed_refunds() == []


def test_racing_payers_of_one_refund_write_refund_paid_once(ledger: Ledger) -> None:
    """The gateway and ``ledger refunds --pay`` (or two runs) record one refund paid at once, with
    webhooks on: one ``refund.paid`` event, from the record that stood; a claim writes none."""
    row = _owed(ledger)
    ledger.subscriptions = lambda owner, event_type: ["erp"]
    assert ledger.record_refund_tx(row.id, TX_A)

    async def race() -> list[bool]:
        return list(await asyncio.gather(*(ledger.run(ledger.record_refund_paid, row.id, TX_A) for _ in range(8))))

    assert asyncio.run(race()).count(True) == 1
    with ledger.outbox_transaction() as connection:
        events = [json.loads(r["payload"]) for r in list_rows(connection) if r["event_type"].startswith("refund.")]
    assert [(e["type"], e["data"]["paymentId"], e["data"]["refundTransaction"]) for e in events] == [
        ("refund.paid", row.id, TX_A)]
