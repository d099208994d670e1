"""A gateway whose facilitator is remote and misbehaves: the content is never served unpaid, an
unknown settlement outcome is a 503 naming the payment (never a 402 inviting a second payment), and
a definite refusal is a 402."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.remote import RemoteFacilitator
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, body_json, demo_catalog, upstream_hits
from tests.e2e.test_exactly_once import process_env, raw_request, signed, wait_for
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.facilitator_double import PENDING_TX_HASH, TX_HASH, FacilitatorDouble, closed_port_url
from tests.support.processes import gateway_processes

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


def test_a_refusal_naming_a_transaction_is_unknown_where_the_chain_cannot_be_read(
    start_gateway: GatewayFactory, double: FacilitatorDouble, devchain: Devchain, upstream: str,
) -> None:
    """``success: false`` naming a transaction (the x402 SDK's "transaction_failed" after it
    broadcast): the facilitator sent something that may land. Without a chain client to read it,
    that is an unknown outcome (503 pending, the hash kept), never a 402 inviting a second payment.
    With one, ``remote_confirm`` reads the chain (tests/e2e/test_attacks_remote_facilitator.py)."""
    double.settle_mode = "transaction_failed"
    gateway = remote_gateway(start_gateway, double.url)
    paid = paid_call(gateway, devchain)
    assert paid.status_code == 503, paid.text
    assert_not_served(paid)
    assert "payment-required" not in paid.headers
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.PENDING and row.tx_hash == PENDING_TX_HASH
    assert body_json(paid)["reason"] == "facilitator_settlement_unconfirmed"


@pytest.mark.parametrize(("mode", "reason"), [("nonce_already_used", "invalid_exact_evm_nonce_already_used")])
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


@pytest.mark.parametrize("restarted_with", ["remote", "local"])
def test_kill_9_while_the_remote_facilitator_settles_then_restart(
    double: FacilitatorDouble, devchain: Devchain, upstream: str, tmp_path: Path, restarted_with: str
) -> None:
    """A crash while waiting for a remote /settle leaves a ``settling`` row without a transaction
    hash: the facilitator may have broadcast it. Start-up reconcile must keep it open (a resend is
    a 503 naming it, never a 402 inviting a second payment); only where the network is settled by
    the local facilitator, which writes the hash ahead of every broadcast, is it "not broadcast"."""
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    local_env = process_env(devchain, demo_catalog(tmp_path, upstream), database_url)
    remote_env = {**local_env, "X402_FACILITATOR_URL": double.url}
    ledger = open_ledger(database_url)
    double.settle_mode = "timeout"  # the gateway waits on /settle until it is killed
    with gateway_processes([remote_env], tmp_path) as [gateway]:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            header = signed(client, devchain, "/quotes/CRASH", payer=PAYER)
        sock = raw_request(gateway.port, "/quotes/CRASH", header)
        wait_for(lambda: len(double.bodies("/settle")) == 1, "the remote /settle")
        [row] = ledger.all()
        assert row.state == PaymentState.SETTLING and row.tx_hash is None
        gateway.kill9()
        sock.close()
    # The facilitator did broadcast: asked again, it answers that the nonce is used.
    double.settle_mode = "nonce_already_used"
    double.release()
    env = remote_env if restarted_with == "remote" else local_env
    with gateway_processes([env], tmp_path) as [restarted]:
        [row] = ledger.all()
        resend = httpx.get(f"{restarted.url}/quotes/CRASH", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    if restarted_with == "remote":
        assert row.state in (PaymentState.SETTLING, PaymentState.PENDING), row.error_reason
        assert resend.status_code == 503, resend.text
        assert body_json(resend)["error"] == "settlement_unknown"
        assert body_json(resend)["paymentId"] == row.id
        assert "payment-required" not in resend.headers
        assert_not_served(resend)
        assert len(double.bodies("/settle")) == 1  # never asked to settle it a second time
        [after] = ledger.all()
        assert after.state == PaymentState.PENDING
    else:
        # the local facilitator writes ahead: no hash means this gateway never broadcast it
        assert row.state == PaymentState.FAILED and row.error_reason == "not_broadcast"
        assert resend.status_code == 200, resend.text
        [after] = ledger.all()
        assert after.state == PaymentState.SETTLED and after.tx_hash is not None
    ledger.close()
