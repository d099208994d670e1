"""The payment ledger on both backends it supports: SQLite (a file under tmp_path) and PostgreSQL."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from settlement.errors import LedgerError
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schema import open_ledger
from tests.support.ledger_rows import force_row

NETWORK = "eip155:31337"
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


def fields(**changes: Any) -> dict[str, Any]:
    nonce = "0x" + secrets.token_hex(32)
    row: dict[str, Any] = {
        "request_id": secrets.token_hex(8),
        "owner": "acme",
        "tool": "weather",
        "method": "GET",
        "path": "/weather?city=Lisbon",
        "payer": PAYER,
        "pay_to": PAY_TO,
        "amount": 10_000,
        "network": NETWORK,
        "asset": ASSET,
        "nonce": nonce,
        "valid_before": 1_700_000_060,
        "authorization": '{"nonce":"%s"}' % nonce,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize("amount", [0, 1, 10**30, 2**200, 2**256 - 1])
def test_amounts_round_trip_exactly(ledger: Ledger, amount: int) -> None:
    row = ledger.record_verified(**fields(amount=amount))

    stored = ledger.get(row.id)

    assert stored is not None
    assert stored.amount == amount
    assert type(stored.amount) is int


def test_amount_update_round_trips_exactly(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id)

    ledger.record_refund_owed(row.id, 2**200 + 1, "upstream_error")

    assert ledger.get(row.id).refund_owed == 2**200 + 1  # type: ignore[union-attr]


def test_new_row_is_verified(ledger: Ledger) -> None:
    data = fields()

    row = ledger.record_verified(**data)

    assert row.id is not None
    assert row.state == PaymentState.VERIFIED
    stored = ledger.get(row.id)
    assert stored is not None
    for key, value in data.items():
        assert getattr(stored, key) == value, key
    assert stored.tx_hash is None and stored.block_number is None and stored.error_reason is None
    assert stored.created_at is not None and stored.updated_at is not None


@pytest.mark.parametrize("amount", [True, False, 1.0, 10_000.0, "10000"])
def test_non_int_amount_is_refused(ledger: Ledger, amount: Any) -> None:
    data = fields(amount=amount)

    with pytest.raises((TypeError, LedgerError)):
        ledger.record_verified(**data)

    assert ledger.by_request_id(data["request_id"]) is None
    assert ledger.all() == []


@pytest.mark.parametrize("amount", [True, 2.5])
def test_non_int_amount_update_is_refused(ledger: Ledger, amount: Any) -> None:
    row = ledger.record_verified(**fields(amount=7))
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id)

    with pytest.raises((TypeError, LedgerError)):
        ledger.record_refund_owed(row.id, amount, "upstream_error")

    assert ledger.get(row.id).refund_owed is None  # type: ignore[union-attr]


def test_same_authorization_twice_returns_the_same_row(ledger: Ledger) -> None:
    first = ledger.record_verified(**fields(nonce="0x" + "11" * 32))

    again = ledger.record_verified(**fields(nonce="0x" + "11" * 32))

    assert again.id == first.id
    assert again.request_id == first.request_id
    assert again.state == PaymentState.VERIFIED
    assert len(ledger.all()) == 1


@pytest.mark.parametrize("state", [PaymentState.SETTLED, PaymentState.SETTLING, PaymentState.PENDING])
def test_same_authorization_after_money_may_have_moved_is_unchanged(ledger: Ledger, state: PaymentState) -> None:
    first = ledger.record_verified(**fields(nonce="0x" + "22" * 32))
    force_row(ledger, first.id, state=state, tx_hash="0x" + "ab" * 32, block_number=9)

    again = ledger.record_verified(**fields(nonce="0x" + "22" * 32, request_id="second"))

    assert again.id == first.id
    assert again.state == state
    assert again.request_id == first.request_id
    assert ledger.by_request_id("second") is None
    stored = ledger.get(first.id)
    assert stored is not None
    assert (stored.state, stored.tx_hash, stored.block_number) == (state, "0x" + "ab" * 32, 9)


def test_failed_after_broadcast_is_not_reused(ledger: Ledger) -> None:
    first = ledger.record_verified(**fields(nonce="0x" + "33" * 32))
    ledger.begin_settlement(first.id, None)
    ledger.fail(first.id, "transaction_failed", tx_hash="0x" + "cd" * 32)

    again = ledger.record_verified(**fields(nonce="0x" + "33" * 32, request_id="second"))

    assert again.id == first.id
    assert again.state == PaymentState.FAILED
    assert again.error_reason == "transaction_failed"
    assert ledger.by_request_id("second") is None


@pytest.mark.parametrize(
    "previous",
    [
        {"state": PaymentState.VOIDED, "upstream_status": 502},
        {"state": PaymentState.FAILED, "error_reason": "invalid_exact_evm_payload_authorization_valid_before"},
    ],
    ids=["voided", "failed_before_broadcast"],
)
def test_authorization_that_moved_no_money_is_reused(ledger: Ledger, previous: dict[str, Any]) -> None:
    nonce = "0x" + "44" * 32
    first = ledger.record_verified(**fields(nonce=nonce, request_id="first", tool="weather"))
    force_row(ledger, first.id, **previous)

    again = ledger.record_verified(**fields(nonce=nonce, request_id="second", tool="forecast", path="/forecast"))

    assert again.id == first.id
    assert again.state == PaymentState.VERIFIED
    stored = ledger.by_request_id("second")
    assert stored is not None
    assert stored.id == first.id
    assert (stored.state, stored.tool, stored.path) == (PaymentState.VERIFIED, "forecast", "/forecast")
    assert stored.error_reason is None and stored.upstream_status is None
    assert ledger.by_request_id("first") is None
    assert len(ledger.all()) == 1


def test_reused_row_describes_the_new_authorization(ledger: Ledger) -> None:
    # An unused EIP-3009 nonce may be signed again with other terms (another tool, price, payee or
    # deadline). The reused row must record the payment it now stands for: reconcile re-checks
    # `authorization`, and accounting reads `amount` and `pay_to`.
    nonce = "0x" + "88" * 32
    first = ledger.record_verified(**fields(nonce=nonce, request_id="first"))
    ledger.void(first.id, None)
    new_terms = fields(
        nonce=nonce,
        request_id="second",
        tool="forecast",
        amount=25_000,
        pay_to="0x90F79bf6EB2c4f870365E785982E1f101E93b906",
        valid_before=1_700_000_600,
        authorization='{"nonce":"%s","value":"25000"}' % nonce,
    )

    ledger.record_verified(**new_terms)

    stored = ledger.by_request_id("second")
    assert stored is not None and stored.id == first.id
    for key, value in new_terms.items():
        assert getattr(stored, key) == value, key


def test_different_authorizations_get_different_rows(ledger: Ledger) -> None:
    a = ledger.record_verified(**fields(nonce="0x" + "55" * 32))
    b = ledger.record_verified(**fields(nonce="0x" + "66" * 32))
    c = ledger.record_verified(**fields(nonce="0x" + "55" * 32, network="eip155:8453"))

    assert len({a.id, b.id, c.id}) == 3
    assert [row.id for row in ledger.all()] == sorted([a.id, b.id, c.id])


def test_state_transitions_persist(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())

    ledger.begin_settlement(row.id, None)
    assert ledger.get(row.id).state == PaymentState.SETTLING  # type: ignore[union-attr]

    ledger.mark_pending(row.id, tx_hash="0x" + "ef" * 32)
    assert ledger.get(row.id).state == PaymentState.PENDING  # type: ignore[union-attr]

    ledger.mark_settled(row.id, block_number=2**40)
    ledger.record_upstream_status(row.id, 200)
    stored = ledger.get(row.id)
    assert stored is not None
    assert stored.state == PaymentState.SETTLED
    assert isinstance(stored.state, str) and stored.state == "settled"
    assert stored.tx_hash == "0x" + "ef" * 32
    assert stored.block_number == 2**40
    assert stored.upstream_status == 200


def test_state_survives_reopening(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields(amount=2**200))
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id)

    reopened = open_ledger(ledger.url)
    try:
        stored = reopened.get(row.id)
    finally:
        reopened.close()

    assert stored is not None
    assert (stored.state, stored.amount) == (PaymentState.SETTLED, 2**200)


def test_by_request_id(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields(request_id="req-1"))
    ledger.record_verified(**fields(request_id="req-2"))

    found = ledger.by_request_id("req-1")

    assert found is not None and found.id == row.id
    assert ledger.by_request_id("req-3") is None


def test_by_authorization(ledger: Ledger) -> None:
    nonce = "0x" + "77" * 32
    row = ledger.record_verified(**fields(nonce=nonce))

    found = ledger.by_authorization(NETWORK, ASSET, PAYER, nonce)

    assert found is not None and found.id == row.id
    assert ledger.by_authorization(NETWORK, ASSET, PAYER, "0x" + "78" * 32) is None
    assert ledger.by_authorization("eip155:1", ASSET, PAYER, nonce) is None
    assert ledger.by_authorization(NETWORK, ASSET, PAY_TO, nonce) is None


def test_update_of_a_missing_row(ledger: Ledger) -> None:
    with pytest.raises(LedgerError) as caught:
        ledger.mark_settled(123_456)

    assert caught.value.code == "ledger_row_missing"


def test_get_of_a_missing_row(ledger: Ledger) -> None:
    assert ledger.get(123_456) is None


def test_rows_are_detached_and_readable(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())

    [listed] = ledger.all()

    assert isinstance(listed, Payment)
    assert (listed.id, listed.payer, listed.amount) == (row.id, PAYER, 10_000)


def test_unreachable_database_is_a_ledger_error() -> None:
    with pytest.raises(LedgerError):
        open_ledger("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
