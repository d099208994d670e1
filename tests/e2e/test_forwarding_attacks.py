"""Forward only what was validated, paid end to end on a real anvil (issue 13, finding 6).

A free-rider who gets one body validated and another acted on, a header smuggled through a mapped
argument, a body on a GET; an upstream that redirects to leak the paid content or forges our
receipt: each is checked against the chain (balances), the ledger and the upstream's own record
of exactly what reached it, not just the status code. The POST tools name their settle mode, so
the tests hold whichever is the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.forwarding_upstream import SECRET_CONTENT, Received

PAYER = 5

SCHEMA = """
    input_schema:
      type: object
      properties:
        id: {type: string, pattern: "^[0-9]+$"}
        symbol: {type: string, pattern: "^[A-Z]{1,5}$"}
        quantity: {type: integer, minimum: 1, maximum: 1000}
        price: {type: number}
        note: {type: string, maxLength: 100}
      additionalProperties: false
"""


def tool(name: str, method: str, path: str, upstream_path: str, settle: str = "after", extra: str = "") -> str:
    return (f"  - name: {name}\n    description: d\n    method: {method}\n    path: {path}\n    price: \"0.001\"\n"
            f"    settle: {settle}\n    upstream_path: {upstream_path}\n{extra}{SCHEMA}")


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
            recorder: tuple[ThreadServer, list[Received]]) -> RunningGateway:
    tools = "".join([
        tool("order_after", "POST", "/orders/after", "/rec/orders", "after"),
        tool("order_upfront", "POST", "/orders/upfront", "/rec/orders", "upfront"),
        tool("lookup", "GET", "/lookup/{id}", "/rec/lookup/{id}"),
        tool("noted", "GET", "/noted", "/rec/noted", extra="    request: {headers: {X-Note: note}}\n"),
        tool("moved", "GET", "/moved", "/redirect"),
        tool("spoofed", "GET", "/spoofed", "/spoof"),
    ])
    catalog = tmp_path / "forwarding.yaml"
    catalog.write_text(f"""
catalog: 1
owner: forwarding-test
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{recorder[0].url}", timeout_seconds: 5}}
tools:
{tools}""")
    return start_gateway(catalog)


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def signed_for(client: httpx.Client, devchain: Devchain, method: str, path: str, **kwargs: Any) -> str:
    """A valid payment for an honest request, to present with a different one."""
    offer = offer_of(client.request(method, path, **kwargs))
    return encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))


def assert_nothing_happened(gateway: RunningGateway, devchain: Devchain, received: list[Received],
                            before: tuple[int, int]) -> None:
    assert received == []  # the upstream never heard of it
    assert gateway.ledger.all() == []  # no payment row: refused before verify
    assert balances(devchain) == before


DUPLICATES = [
    b'{"quantity":999999,"symbol":"ACME","quantity":1}',
    b'{"symbol":"ACME","quantity":1,"note":"x","note":"y"}',
]


@pytest.mark.parametrize("body", DUPLICATES)
def test_a_duplicate_json_key_is_refused_before_any_offer_or_charge(
    gateway: RunningGateway, devchain: Devchain, received: list[Received], body: bytes
) -> None:
    before = balances(devchain)
    headers = {"content-type": "application/json"}
    with gateway.client() as client:
        unpaid = client.post("/orders/after", content=body, headers=headers)
        assert unpaid.status_code == 400 and unpaid.json()["error"] == "duplicate_json_key", unpaid.text
        assert "payment-required" not in unpaid.headers
        payment = signed_for(client, devchain, "POST", "/orders/after", json={"symbol": "ACME", "quantity": 1})
        paid = client.post("/orders/after", content=body, headers={**headers, "PAYMENT-SIGNATURE": payment})
    assert paid.status_code == 400 and paid.json()["error"] == "duplicate_json_key", paid.text
    assert paid.json()["key"] in ("quantity", "note")
    assert "payment-response" not in paid.headers
    assert_nothing_happened(gateway, devchain, received, before)


@pytest.mark.parametrize("path", ["/orders/after", "/orders/upfront"])
def test_a_paid_post_sends_the_upstream_exactly_the_validated_json(
    gateway: RunningGateway, devchain: Devchain, received: list[Received], path: str
) -> None:
    before = balances(devchain)
    body = b'{ "symbol" : "ACME",\n  "quantity": 1, "price": 10.10000000000000000001 }'
    headers = {"content-type": "text/plain", "cookie": "agent=1"}
    with gateway.client() as client:
        payment = signed_for(client, devchain, "POST", path, content=body, headers=headers)
        paid = client.post(path, content=body, headers={**headers, "PAYMENT-SIGNATURE": payment})
    assert paid.status_code == 200, paid.text
    assert paid.json()["firstKeyWins"] == {"symbol": "ACME", "quantity": 1, "price": 10.1}
    [got] = received
    assert got.body == b'{"symbol":"ACME","quantity":1,"price":10.10000000000000000001}'
    assert got.header("content-type") == "application/json" and got.header("cookie") is None
    assert receipt_of(paid).success
    assert balances(devchain) == (before[0] - 1000, before[1] + 1000)
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED


def test_a_body_on_a_get_is_refused_before_any_offer_or_charge(
    gateway: RunningGateway, devchain: Devchain, received: list[Received]
) -> None:
    before = balances(devchain)
    with gateway.client() as client:
        unpaid = client.request("GET", "/lookup/1", content=b'{"id":"2"}')
        assert unpaid.status_code == 400 and unpaid.json()["error"] == "body_not_allowed", unpaid.text
        payment = signed_for(client, devchain, "GET", "/lookup/1")
        paid = client.request("GET", "/lookup/1", content=b'{"id":"2"}', headers={"PAYMENT-SIGNATURE": payment})
    assert paid.status_code == 400 and paid.json()["error"] == "body_not_allowed", paid.text
    assert_nothing_happened(gateway, devchain, received, before)


@pytest.mark.parametrize("note", ["a\r\nX-Injected: 1", "a\nb", "a\x00b"])
def test_control_characters_bound_for_an_upstream_header_are_a_422_before_any_offer(
    gateway: RunningGateway, devchain: Devchain, received: list[Received], note: str
) -> None:
    before = balances(devchain)
    with gateway.client() as client:
        unpaid = client.get("/noted", params={"note": note})
        assert unpaid.status_code == 422, unpaid.text
        assert unpaid.json()["error"] == "invalid_arguments"
        assert [f["field"] for f in unpaid.json()["fields"]] == ["note"]
        payment = signed_for(client, devchain, "GET", "/noted", params={"note": "fine"})
        paid = client.get("/noted", params={"note": note}, headers={"PAYMENT-SIGNATURE": payment})
    assert paid.status_code == 422 and paid.json()["error"] == "invalid_arguments", paid.text
    assert_nothing_happened(gateway, devchain, received, before)


def test_an_upstream_redirect_is_a_502_that_leaks_nothing_and_charges_nothing(
    gateway: RunningGateway, devchain: Devchain, received: list[Received]
) -> None:
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/moved", payer=PAYER)
    assert paid.status_code == 502, paid.text
    assert paid.json()["error"] == "upstream_redirect" and paid.json()["upstreamStatus"] == 302
    assert "location" not in paid.headers and "payment-response" not in paid.headers
    assert SECRET_CONTENT not in paid.content and b"paid content" not in paid.content
    assert len(received) == 1  # asked once, never followed
    assert balances(devchain) == before
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.tx_hash is None


def test_an_upstream_cannot_forge_the_receipt_or_gateway_headers(
    gateway: RunningGateway, devchain: Devchain, received: list[Received]
) -> None:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/spoofed", payer=PAYER)
    assert paid.status_code == 200, paid.text
    receipt = receipt_of(paid)  # ours, one header, naming the real settlement on chain
    assert paid.headers.get_list("payment-response") == [paid.headers["payment-response"]]
    assert receipt.success and devchain.w3.eth.get_transaction_receipt(receipt.transaction)["status"] == 1
    [row] = gateway.ledger.all()
    assert row.tx_hash == receipt.transaction
    for forged in ("x-payment-response", "payment-required", "x402gw-replay", "x402gw-refund", "set-cookie"):
        assert forged not in paid.headers, forged
    assert paid.headers["x-upstream-note"] == "kept"
