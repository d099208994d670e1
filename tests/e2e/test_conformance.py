"""x402 conformance on a real chain: versions, binding, HEAD, status and header handling, CORS."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, RunningGateway, body_json, offer_of, upstream_hits
from tests.e2e.test_paid_call import pay, receipt_of

PAYER = 5


def signed_for(client: httpx.Client, devchain: Devchain, method: str, path: str, **kwargs: Any) -> str:
    """A valid PAYMENT-SIGNATURE for the offer of (method, path), not yet used."""
    offer = offer_of(client.request(method, path, **kwargs))
    return encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))


def test_payment_for_one_route_is_refused_on_another_at_the_same_price(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    before = devchain.balance(devchain.address(PAYER))
    with gateway.client() as client:
        header = signed_for(client, devchain, "GET", "/quotes/AAPL")
        other = client.get("/quotes/MSFT", headers={"PAYMENT-SIGNATURE": header})
    assert other.status_code == 402
    assert body_json(other)["error"] == "payment_requirements_mismatch"
    assert body_json(other)["field"] == "extra.requestBinding"
    assert devchain.balance(devchain.address(PAYER)) == before
    assert upstream_hits(upstream, "GET /api/v1/quote/MSFT") == 0


def test_payment_for_one_query_is_refused_on_another(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    with gateway.client() as client:
        header = signed_for(client, devchain, "GET", "/weather?city=Lisbon")
        other = client.get("/weather?city=Paris", headers={"PAYMENT-SIGNATURE": header})
        reordered = client.get("/weather?city=Lisbon", headers={"PAYMENT-SIGNATURE": header})
    assert other.status_code == 402 and body_json(other)["error"] == "payment_requirements_mismatch"
    assert reordered.status_code == 200, reordered.text  # the route it was made for still accepts it
    assert upstream_hits(upstream, "GET /weather") == 1


SAME_PRICE_CATALOG = """
catalog: 1
owner: binding-test
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: read_order
    description: Read
    method: GET
    path: /orders/{{order_id}}
    price: "0.001"
  - name: drop_order
    description: Delete
    method: DELETE
    path: /orders/{{order_id}}
    price: "0.001"
"""


def test_payment_for_get_is_refused_on_delete_at_the_same_price(
    start_gateway: Any, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "same-price.yaml"
    catalog.write_text(SAME_PRICE_CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog=catalog)
    with gateway.client() as client:
        header = signed_for(client, devchain, "GET", "/orders/7")
        deleted = client.delete("/orders/7", headers={"PAYMENT-SIGNATURE": header})
    assert deleted.status_code == 402
    assert body_json(deleted)["error"] == "payment_requirements_mismatch"
    assert upstream_hits(upstream, "DELETE /orders/7") == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("pay_to", "0x000000000000000000000000000000000000dEaD"), ("asset", "0x" + "11" * 20),
     ("network", "eip155:8453"), ("amount", "1999"), ("max_timeout_seconds", 99999), ("scheme", "upto")],
)
def test_altered_offer_fields_are_refused_before_settlement(
    gateway: RunningGateway, devchain: Devchain, field: str, value: Any
) -> None:
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/ALTER", payer=PAYER, accepted={field: value})
    assert paid.status_code == 402
    assert body_json(paid)["error"] == "payment_requirements_mismatch"
    assert devchain.balance(PAY_TO) == before
    assert gateway.ledger.all() == []


def test_unpaid_head_gets_the_get_offer_and_paid_head_never_settles(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    with gateway.client() as client:
        get = client.get("/quotes/HEADS")
        head = client.head("/quotes/HEADS")
        header = signed_for(client, devchain, "GET", "/quotes/HEADS")
        paid_head = client.head("/quotes/HEADS", headers={"PAYMENT-SIGNATURE": header})
        after_head = client.get("/quotes/HEADS", headers={"PAYMENT-SIGNATURE": header})
    assert head.status_code == 402
    assert head.headers["payment-required"] == get.headers["payment-required"]
    assert paid_head.status_code == 402 and "payment-response" not in paid_head.headers
    # The HEAD did not use the authorization: the same payment still buys the GET, once.
    assert after_head.status_code == 200 and receipt_of(after_head).success
    assert upstream_hits(upstream, "HEAD /api/v1/quote/HEADS") == 0
    assert upstream_hits(upstream, "GET /api/v1/quote/HEADS") == 1


def test_upstream_202_and_201_keep_status_and_headers(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        _, queued, _ = pay(client, devchain, "POST", "/reports", payer=PAYER, json={"topic": "usage"})
        _, created, _ = pay(client, devchain, "POST", "/orders", payer=PAYER, json={"symbol": "ACME", "quantity": 1})
    assert queued.status_code == 202 and queued.headers["location"].startswith("/reports/")
    assert created.status_code == 201 and created.headers["location"].startswith("/orders/")
    for response in (queued, created):
        assert response.headers["cache-control"] == "private, no-store"
        assert receipt_of(response).success


def test_cors_exposes_payment_headers(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        preflight = client.options(
            "/quotes/AAPL",
            headers={"Origin": "https://agent.example", "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "payment-signature, x-payment"},
        )
        challenge = client.get("/quotes/AAPL", headers={"Origin": "https://agent.example"})
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "payment-signature" in allowed and "x-payment" in allowed
    exposed = challenge.headers["access-control-expose-headers"].lower()
    assert "payment-required" in exposed and "payment-response" in exposed


def v1_payment(devchain: Devchain, requirements: PaymentRequirements, network: str) -> str:
    payload = Payer(devchain.key(PAYER)).sign(requirements).to_wire()
    return encode_header({"x402Version": 1, "scheme": "exact", "network": network, "payload": payload["payload"]})


def test_v1_client_pays_with_x_payment_and_gets_x_payment_response(
    gateway: RunningGateway, devchain: Devchain
) -> None:
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        requirements = offer_of(client.get("/quotes/VONE")).accepts[0]
        paid = client.get("/quotes/VONE", headers={"X-PAYMENT": v1_payment(devchain, requirements, "eip155:31337")})
    assert paid.status_code == 200, paid.text
    receipt = decode_header_json(paid.headers["x-payment-response"])
    assert receipt["success"] is True and receipt["transaction"].startswith("0x")
    assert receipt["payer"] == devchain.address(PAYER) and receipt["network"] == "eip155:31337"
    assert "payment-response" not in paid.headers
    assert devchain.balance(PAY_TO) == before + 2000
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED


def test_v1_refusals_carry_a_v1_body_and_v2_header(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        requirements = offer_of(client.get("/quotes/VONE")).accepts[0]
        wrong_net = client.get("/quotes/VONE", headers={"X-PAYMENT": v1_payment(devchain, requirements, "base")})
    assert wrong_net.status_code == 402
    body = body_json(wrong_net)
    assert body["x402Version"] == 1 and body["error"] == "payment_requirements_mismatch"
    assert body["accepts"][0]["maxAmountRequired"] == "2000"
    assert body["accepts"][0]["resource"].endswith("/quotes/VONE")
    assert decode_header_json(wrong_net.headers["payment-required"])["x402Version"] == 2


def test_v1_challenge_body_setting_keeps_the_v2_header(start_gateway: Any) -> None:
    gateway = start_gateway(challenge_body="v1")
    with gateway.client() as client:
        response = client.get("/quotes/AAPL")
    assert response.status_code == 402
    assert body_json(response)["x402Version"] == 1
    assert body_json(response)["accepts"][0]["network"] == "eip155:31337"  # no legacy name for anvil
    assert decode_header_json(response.headers["payment-required"])["x402Version"] == 2


def test_oversized_payment_header_is_a_400(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        response = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": "A" * 9000})
    assert response.status_code == 400
    assert body_json(response)["error"] == "payment_header_too_large"


HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "+/=-_.:{}\"[], ", max_size=600).map(str.strip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(
    HEADER_TEXT,
    st.builds(lambda v: encode_header({"x402Version": v} if not isinstance(v, dict) else v),
              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)),
))
def test_any_payment_header_gets_a_structured_refusal(gateway: RunningGateway, upstream: str, header: str) -> None:
    with gateway.client() as client:
        response = client.get("/quotes/FUZZ", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code in (400, 402), response.text
    body = body_json(response)
    assert isinstance(body["error"], str) and body["error"]
    assert "symbol" not in body  # never the paid content
    assert upstream_hits(upstream, "GET /api/v1/quote/FUZZ") == 0
