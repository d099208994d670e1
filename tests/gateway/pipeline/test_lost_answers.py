"""``Refunds.owe_lost_answers``: after a reconcile settled an ``upfront`` payment whose answer never
came, the refund is owed without waiting for a resend; never for a row a live request still holds,
never for one that has its answer, never twice. (End to end, with kill -9 and a real anvil:
tests/e2e/test_attacks_crash_upfront.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.pipeline.refunds import Refunds
from gateway.store import MemoryStore, payment_lock
from settlement.ledger import Ledger, PaymentState
from settlement.ledger.resolve import Resolution
from settlement.schema import open_ledger
from tests.settlement.ledger.test_ledger import fields


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield opened
    opened.close()


def settled(ledger: Ledger, mode: str) -> tuple[int, Resolution]:
    row = ledger.record_verified(**fields(settle_mode=mode))
    ledger.begin_settlement(row.id, None, tx_hash="0x" + "aa" * 32)
    ledger.mark_settled(row.id, block_number=7)
    return row.id, Resolution(row.id, row.request_id, "settling", "settled", "0x" + "aa" * 32, 7, "mined")


def test_an_upfront_payment_settled_without_an_answer_owes_its_refund_once(ledger: Ledger) -> None:
    payment_id, resolution = settled(ledger, "upfront")
    refunds, store = Refunds(ledger, None), MemoryStore()
    assert asyncio.run(refunds.owe_lost_answers(store, [resolution])) == [payment_id]
    row = ledger.get(payment_id)
    assert row is not None and row.refund_owed == row.amount == 10_000 and row.state == PaymentState.SETTLED
    assert asyncio.run(refunds.owe_lost_answers(store, [resolution])) == []  # never twice


def test_a_row_with_its_answer_or_settled_after_its_call_owes_nothing(ledger: Ledger) -> None:
    answered, answered_resolution = settled(ledger, "upfront")
    ledger.store_response(answered, (200, [], b"{}"))
    after, after_resolution = settled(ledger, "after")
    refunds = Refunds(ledger, None)
    assert asyncio.run(refunds.owe_lost_answers(MemoryStore(), [answered_resolution, after_resolution])) == []
    assert all(ledger.get(i).refund_owed is None for i in (answered, after))  # type: ignore[union-attr]


def test_a_row_whose_payment_lock_a_live_request_holds_is_left_to_it(ledger: Ledger) -> None:
    payment_id, resolution = settled(ledger, "upfront")
    row = ledger.get(payment_id)
    assert row is not None
    store, refunds = MemoryStore(), Refunds(ledger, None)

    async def run() -> tuple[list[int], list[int]]:
        key = payment_lock(row.network, row.payer, row.nonce)  # the lock the paid path takes
        assert await store.acquire(key, "a-live-replica-request", 60_000)
        held = await refunds.owe_lost_answers(store, [resolution])
        await store.release(key, "a-live-replica-request")
        return held, await refunds.owe_lost_answers(store, [resolution])

    assert asyncio.run(run()) == ([], [payment_id])


def test_at_start_up_every_such_row_is_found_whoever_settled_it(ledger: Ledger) -> None:
    """`x402gw reconcile` (or another process) may have settled a dead request's row: the start-up
    sweep reads the ledger, not only what this process resolved."""
    lost, _ = settled(ledger, "upfront")
    answered, _ = settled(ledger, "upfront")
    ledger.store_response(answered, (200, [], b"{}"))
    refunded, _ = settled(ledger, "upfront")
    ledger.record_refund_owed(refunded, 10_000, "upstream_error")
    assert [row.id for row in ledger.answers_lost()] == [lost]
    assert asyncio.run(Refunds(ledger, None).owe_lost_answers(MemoryStore())) == [lost]
    assert ledger.answers_lost() == []
