"""A gateway whose facilitator is remote and misbehaves: the content is never served unpaid, an
unknown settlement outcome is a 503 naming the payment (never a 402 inviting a second payment), and
a definite refusal is a 402."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from settlement.ledger import PaymentState
from settlement.remote import RemoteFacilitator
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, body_json, upstream_hits
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.facilitator_double import PENDING_TX_HASH, TX_HASH, FacilitatorDouble, closed_port_url

PAYER = 5


@pytest.fixture
def double() -> Iterator[FacilitatorDouble]:
    fake = FacilitatorDouble().start()
    yield fake
    fake.stop()


def remote_gateway(start_gateway: GatewayFactory, url: str) -> RunningGateway:
    # Short client timeouts: the double's timeout mode never answers until the test ends.
    return start_gateway(facilitator=RemoteFacilitator(url, verify_timeout=0.5, settle_timeout=0.5))


def paid_call(gateway: RunningGateway, devchain: Devchain) -> httpx.Response:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
    return paid


def assert_not_served(paid: httpx.Response) -> None:
    assert not 200 <= paid.status_code < 300, paid.text
    assert "symbol" not in body_json(paid)
    if "payment-response" in paid.headers:
        assert receipt_of(paid).success is False


@pytest.mark.parametrize(
    ("mode", "error", "reason", "transaction"),
    [
        ("timeout", "settlement_unknown", "facilitator_timeout", None),
        ("html_502", "settlement_unknown", "facilitator_bad_response", None),
        ("json_503_success", "settlement_pending", "facilitator_error_status", TX_HASH),
        ("non_json", "settlement_unknown", "facilitator_bad_response", None),
        ("truncated_json", "settlement_pending", "facilitator_bad_response", TX_HASH),
        ("success_without_tx", "settlement_unknown", "facilitator_bad_response", None),
        ("pending", "settlement_pending", "settlement_pending", PENDING_TX_HASH),
        ("invalid_transaction_state", "settlement_unknown", "invalid_transaction_state", None),
    ],
)
def test_unknown_settlement_outcome_is_a_503_naming_the_payment(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain, upstream: str,
    mode: str, error: str, reason: str, transaction: str | None,
) -> None:
    double.settle_mode = mode
    gateway = remote_gateway(start_gateway, double.url)
    before = devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 503, paid.text
    assert_not_served(paid)
    body = body_json(paid)
    [row] = gateway.ledger.all()
    assert body["error"] == error
    assert body["reason"] == reason
    assert body["paymentId"] == row.id
    assert body.get("transaction") == transaction
    assert paid.headers["retry-after"].isdigit()
    assert "payment-required" not in paid.headers  # no fresh offer: that would invite a second payment
    assert row.state == PaymentState.PENDING
    assert row.tx_hash == transaction and row.error_reason == reason
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1
    assert (devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)) == before
    assert len(double.bodies("/verify")) == len(double.bodies("/settle")) == 1


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("nonce_already_used", "invalid_exact_evm_nonce_already_used"), ("transaction_failed", "transaction_failed")],
)
def test_definite_settlement_refusal_is_a_402(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain, mode: str, reason: str
) -> None:
    double.settle_mode = mode
    gateway = remote_gateway(start_gateway, double.url)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 402, paid.text
    assert_not_served(paid)
    assert body_json(paid)["error"] == reason
    assert receipt_of(paid).error_reason == reason
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.FAILED and row.error_reason == reason


def test_good_remote_answers_serve_the_content(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain
) -> None:
    gateway = remote_gateway(start_gateway, double.url)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 200, paid.text
    assert receipt_of(paid).success and receipt_of(paid).transaction == TX_HASH
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == TX_HASH


@pytest.mark.parametrize(
    "mode", ["timeout", "html_502", "non_json", "truncated_json", "missing_is_valid", "json_503_valid"]
)
def test_verify_without_a_usable_answer_is_a_503_and_nothing_runs(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain, upstream: str, mode: str
) -> None:
    double.verify_mode = mode
    gateway = remote_gateway(start_gateway, double.url)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 503, paid.text
    assert_not_served(paid)
    assert body_json(paid)["error"] == "facilitator_unavailable"
    assert gateway.ledger.all() == []
    assert double.bodies("/settle") == []
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 0


def test_unreachable_facilitator_is_a_503(start_gateway: GatewayFactory, devchain: Devchain, upstream: str) -> None:
    gateway = remote_gateway(start_gateway, closed_port_url())
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 503, paid.text
    assert body_json(paid)["error"] == "facilitator_unavailable"
    assert gateway.ledger.all() == []
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 0


def test_verify_refusal_answered_with_400_is_a_402(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain
) -> None:
    double.verify_mode = "verify_invalid_400"
    gateway = remote_gateway(start_gateway, double.url)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 402, paid.text
    assert body_json(paid)["error"] == "invalid_exact_evm_payload_signature"
    assert "payment-required" in paid.headers
    assert gateway.ledger.all() == []
