"""A paid call end to end on a real anvil: money moves exactly when it should, and only then."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.devkit.payer import Payer
from gateway.protocol.offers import request_binding
from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import SettleResponse
from tests.conftest import PAY_TO, Devchain, RunningGateway, body_json, offer_of, upstream_hits

PAYER = 2  # anvil account used by this module's payments


def pay(client: httpx.Client, devchain: Devchain, method: str, path: str, *, payer: int = PAYER,
        tamper: dict[str, Any] | None = None, accepted: dict[str, Any] | None = None,
        **kwargs: Any) -> tuple[httpx.Response, httpx.Response, str]:
    """Unpaid call → 402 → signed payment → paid call. Returns (402, paid response, header)."""
    challenge = client.request(method, path, **kwargs)
    offer = offer_of(challenge)
    requirements = offer.accepts[0]
    if accepted:
        requirements = requirements.model_copy(update=accepted)
    payment = Payer(devchain.key(payer)).sign(requirements, resource=offer.resource, overrides=tamper)
    header = encode_header(payment)
    paid = client.request(method, path, headers={"PAYMENT-SIGNATURE": header}, **kwargs)
    return challenge, paid, header


def receipt_of(response: httpx.Response) -> SettleResponse:
    return SettleResponse.model_validate(decode_header_json(response.headers["payment-response"]))


def test_unpaid_call_gets_an_offer_in_header_and_body(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        response = client.get("/quotes/AAPL")
    offer = offer_of(response)
    assert body_json(response)["accepts"] == [a.to_wire() for a in offer.accepts]
    assert offer.x402_version == 2
    requirement = offer.accepts[0]
    assert requirement.amount == "2000"  # "0.002" at 6 decimals
    assert requirement.asset == devchain.token
    assert requirement.pay_to == PAY_TO
    assert requirement.network == "eip155:31337"
    assert requirement.extra == {
        "name": "USD Coin", "version": "2", "requestBinding": request_binding("GET", "/quotes/AAPL", "")
    }
    assert offer.resource.url.endswith("/quotes/AAPL")
    assert body_json(response)["error"] == "payment_required"


def test_paid_call_settles_exactly_the_price(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    payer = devchain.address(PAYER)
    before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, header = pay(client, devchain, "GET", "/quotes/AAPL")
    assert paid.status_code == 200, paid.text
    assert paid.json()["symbol"] == "AAPL"
    assert paid.headers["cache-control"] == "private, no-store"
    receipt = receipt_of(paid)
    assert receipt.success and receipt.transaction.startswith("0x") and receipt.payer == payer
    assert devchain.balance(payer) == before_payer - 2000
    assert devchain.balance(PAY_TO) == before_pay_to + 2000
    nonce = decode_header_json(header)["payload"]["authorization"]["nonce"]
    assert devchain.authorization_state(payer, nonce) is True
    chain_receipt = devchain.w3.eth.get_transaction_receipt(receipt.transaction)
    assert chain_receipt["status"] == 1
    rows = gateway.ledger.all()
    assert len(rows) == 1
    row = rows[0]
    assert row.state == PaymentState.SETTLED
    assert row.tx_hash == receipt.transaction
    assert row.block_number == chain_receipt["blockNumber"]
    assert (row.amount, row.payer, row.pay_to, row.tool, row.owner) == (2000, payer, PAY_TO, "get_quote", "acme-legacy")
    assert row.request_id == paid.headers["x-request-id"]
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1


def test_post_keeps_upstream_status_and_location(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "POST", "/orders", json={"symbol": "MSFT", "quantity": 3})
    assert paid.status_code == 201, paid.text
    assert paid.headers["location"].startswith("/orders/")
    assert receipt_of(paid).success


def test_resent_payment_gets_the_stored_answer_without_a_second_settlement(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        _, first, header = pay(client, devchain, "GET", "/quotes/IBM")
        assert first.status_code == 200
        after_first = devchain.balance(payer)
        again = client.get("/quotes/IBM", headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["x402gw-replay"] == "true"
    assert receipt_of(again).transaction == receipt_of(first).transaction
    assert devchain.balance(payer) == after_first
    assert upstream_hits(upstream, "GET /api/v1/quote/IBM") == 1
    assert [row.state for row in gateway.ledger.all()] == [PaymentState.SETTLED]


def test_replayed_payment_unknown_to_this_ledger_is_refused(
    start_gateway: Any, devchain: Devchain, upstream: str
) -> None:
    """A used authorization presented where it was not settled (another deployment's ledger)."""
    first_gateway, second_gateway = start_gateway(), start_gateway()
    payer = devchain.address(PAYER)
    with first_gateway.client() as client:
        _, first, header = pay(client, devchain, "GET", "/quotes/IBM")
    assert first.status_code == 200
    after_first = devchain.balance(payer)
    with second_gateway.client() as client:
        replay = client.get("/quotes/IBM", headers={"PAYMENT-SIGNATURE": header})
    assert replay.status_code == 402
    assert body_json(replay)["error"] == "invalid_exact_evm_nonce_already_used"
    assert "payment-required" in replay.headers
    assert devchain.balance(payer) == after_first
    assert second_gateway.ledger.all() == []
    assert upstream_hits(upstream, "GET /api/v1/quote/IBM") == 1


@pytest.mark.parametrize(
    ("tamper", "accepted", "reason"),
    [
        ({"value": 1999}, None, "invalid_exact_evm_payload_authorization_value_mismatch"),
        ({"to": "0x000000000000000000000000000000000000dEaD"}, None, "invalid_exact_evm_payload_recipient_mismatch"),
        ({"valid_before": 1_000_000}, None, "invalid_exact_evm_payload_authorization_valid_before"),
        ({"valid_after": 4_000_000_000}, None, "invalid_exact_evm_payload_authorization_valid_after"),
        (None, {"amount": "1"}, "payment_requirements_mismatch"),
        (None, {"pay_to": "0x000000000000000000000000000000000000dEaD"}, "payment_requirements_mismatch"),
    ],
    ids=["wrong-amount", "wrong-payto", "expired", "not-yet-valid", "altered-accepted-amount", "altered-accepted-payto"],
)
def test_wrong_payments_are_refused_before_anything_moves(
    gateway: RunningGateway, devchain: Devchain, upstream: str,
    tamper: dict[str, Any] | None, accepted: dict[str, Any] | None, reason: str,
) -> None:
    payer = devchain.address(PAYER)
    before = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/ORCL", tamper=tamper, accepted=accepted)
    assert paid.status_code == 402, paid.text
    assert body_json(paid)["error"] == reason
    assert "payment-required" in paid.headers and "payment-response" not in paid.headers
    assert (devchain.balance(payer), devchain.balance(PAY_TO)) == before
    assert upstream_hits(upstream, "GET /api/v1/quote/ORCL") == 0
    assert gateway.ledger.all() == []


def test_bad_signature_is_refused(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/SAP"))
        payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0]).to_wire()
        signature = payment["payload"]["signature"]
        payment["payload"]["signature"] = signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]
        paid = client.get("/quotes/SAP", headers={"PAYMENT-SIGNATURE": encode_header(payment)})
    assert paid.status_code == 402
    assert body_json(paid)["error"] == "invalid_exact_evm_payload_signature"
    assert gateway.ledger.all() == []


def test_signature_by_someone_else_is_refused(gateway: RunningGateway, devchain: Devchain) -> None:
    """Account 3 signs an authorization claiming to be from account 2."""
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/SAP", payer=3, tamper={"from_": devchain.address(PAYER)})
    assert paid.status_code == 402
    assert body_json(paid)["error"] == "invalid_exact_evm_payload_signature"


def test_upstream_500_means_no_settlement(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    payer = devchain.address(PAYER)
    before = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, header = pay(client, devchain, "GET", "/reports/500")
    assert paid.status_code == 500
    assert "payment-response" not in paid.headers
    assert (devchain.balance(payer), devchain.balance(PAY_TO)) == before
    nonce = decode_header_json(header)["payload"]["authorization"]["nonce"]
    assert devchain.authorization_state(payer, nonce) is False
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.upstream_status == 500 and row.tx_hash is None
    assert upstream_hits(upstream, "GET /reports/500") == 1


def test_unexposed_upstream_endpoints_are_not_reachable(gateway: RunningGateway, upstream: str) -> None:
    with gateway.client() as client:
        for method, path in [("GET", "/admin/users"), ("GET", "/api/v1/quote/AAPL"), ("DELETE", "/orders/1"),
                             ("GET", "/internal/health"), ("GET", "/quotes/..%2Fadmin%2Fusers"),
                             ("GET", "/quotes/%2e%2e"), ("GET", "//quotes/AAPL")]:
            response = client.request(method, path)
            assert response.status_code in (404, 405), (method, path, response.status_code)
            assert body_json(response)["error"] in ("not_found", "method_not_allowed")
    assert httpx.get(f"{upstream}/stats").json()["total"] == 0


def test_invalid_arguments_get_422_not_a_price(gateway: RunningGateway, upstream: str) -> None:
    with gateway.client() as client:
        bad_symbol = client.get("/quotes/not-a-ticker")
        missing_city = client.get("/weather")
        bad_order = client.post("/orders", json={"symbol": "MSFT", "quantity": 0})
    for response in (bad_symbol, missing_city, bad_order):
        assert response.status_code == 422, response.text
        assert body_json(response)["error"] == "invalid_arguments"
        assert "payment-required" not in response.headers
    assert body_json(bad_order)["fields"][0]["field"] == "quantity"


def test_malformed_payment_header_is_a_400_with_a_code(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        response = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": "%%% not base64 %%%"})
    assert response.status_code == 400
    body = body_json(response)
    assert body == {"error": "payment_header_not_base64", "message": body["message"], "next": body["next"]}
    assert body["next"]["action"] == "fix_payment"


def test_ledger_on_postgresql(start_gateway: Any, devchain: Devchain, postgres_database: str) -> None:
    gateway = start_gateway(database_url=postgres_database)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/PGSQL"[:10])
    assert paid.status_code == 200, paid.text
    [row] = [r for r in gateway.ledger.all() if r.request_id == paid.headers["x-request-id"]]
    assert row.state == PaymentState.SETTLED and row.amount == 2000
    assert row.tx_hash == receipt_of(paid).transaction
