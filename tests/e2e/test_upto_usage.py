"""Usage-based ``upto`` charges through the gateway on anvil, paid by the official x402 SDK's upto
client: the amount settled is counted from the upstream's answer (a JSON pointer, a header),
priced per unit, capped at the signed maximum; zero settles nothing; an answer whose usage is
missing or a lie is withheld and nothing is charged (or the rule's default is). Beside each, the
invariant: ledger == chain, the upstream called once per paid call, budgets hold only what moved."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient

from gateway.ops.serving import ThreadServer
from gateway.protocol.receipts import decode_signed_receipt
from gateway.surfaces.receipts import DEV_RECEIPT_KEY
from settlement.finance.export import Filters, iter_rows
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import PaymentState
from settlement.schemes import upto_maximum
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.conftest import warehouse_catalog
from tests.e2e.test_reconcile import run_reconcile
from tests.e2e.test_upto_paid_call import _client, _header
from tests.support.ts_payer import ts_pay
from tests.support.usage_upstream import UsageUpstream

MAXIMUM, EACH = 10_000, 1_000  # 0.01 at most; 0.001 per unit
CATALOG = """
catalog: 1
owner: acme-usage
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  lying:
    base_url: "{lying}"
  legacy:
    base_url: "{legacy}"
budgets:
  per_payer: {{amount: "0.014", window: 3600}}
tools:
  - name: metered
    description: Charged 0.001 per unit its answer reports, at most 0.01.
    method: GET
    path: /metered/{{mode}}
    upstream: lying
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: metered_by_header
    description: The same, the units in a header.
    method: GET
    path: /by-header/{{mode}}
    upstream: lying
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: header, header: X-Units}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: metered_or_two
    description: The same, two units when the answer says nothing readable.
    method: GET
    path: /or-two/{{mode}}
    upstream: lying
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units, default: 2}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: complete
    description: A text completion, charged per token used plus a base.
    method: POST
    path: /complete
    upstream: legacy
    upstream_path: /v1/completions
    price: 0.00001
    max_price: 0.005
    settle: after
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/total_tokens, base: 0.001}}
    input_schema:
      type: object
      properties:
        prompt: {{type: string}}
        max_tokens: {{type: integer, minimum: 1, maximum: 512}}
      required: [prompt, max_tokens]
"""


@pytest.fixture(scope="module")
def lying() -> Iterator[tuple[str, UsageUpstream]]:
    upstream = UsageUpstream()
    with ThreadServer(upstream.app()) as server:
        yield server.url, upstream


def _gateway(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, lying_url: str, legacy: str) -> RunningGateway:
    path = tmp_path / "usage.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, lying=lying_url, legacy=legacy))
    return start_gateway(path)


def _pay(gateway: RunningGateway, devchain: Devchain, payer: int, path: str, body: dict[str, Any] | None = None) -> tuple[httpx.Response, Any]:
    """One call paid by the SDK's upto client; the answer and its settlement receipt."""

    async def call() -> tuple[httpx.Response, Any]:
        async with x402HttpxClient(_client(devchain, payer), timeout=30) as http:
            response = await (http.post(gateway.url + path, json=body) if body is not None else http.get(gateway.url + path))
            receipt = x402HTTPClient(_client(devchain, payer)).get_payment_settle_response(response.headers.get) \
                if "payment-response" in response.headers else None
            return response, receipt

    return asyncio.run(call())


def _balances(devchain: Devchain, payer: int) -> tuple[int, int]:
    return devchain.balance(devchain.address(payer)), devchain.balance(PAY_TO)


def _moved(devchain: Devchain, payer: int, before: tuple[int, int]) -> tuple[int, int]:
    now = _balances(devchain, payer)
    return before[0] - now[0], now[1] - before[1]


@pytest.fixture
def usage_gateway(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path,
                  lying: tuple[str, UsageUpstream], upstream: str) -> RunningGateway:
    return _gateway(start_gateway, devchain, tmp_path, lying[0], upstream)


def test_the_offer_states_the_maximum_and_the_usage_rule(usage_gateway: RunningGateway) -> None:
    with usage_gateway.client() as http:
        offer = http.get("/metered/json-1")
        tools = {t["function"]["name"]: t for t in http.get("/tools").json()["tools"]}
    [accept] = json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"]))["accepts"]
    assert accept["scheme"] == "upto" and accept["amount"] == str(MAXIMUM)
    assert accept["extra"]["charge"] == {"basis": "usage", "from": "json", "pointer": "/usage/units", "pricePerUnit": "0.001"}
    assert tools["complete"]["usage"]["base"] == "0.001" and tools["complete"]["maximum"] == "0.005"
    assert "per unit of usage" in tools["metered"]["chargeText"]


def test_a_completion_settles_its_tokens_below_the_maximum_and_the_books_agree(
    usage_gateway: RunningGateway, devchain: Devchain,
) -> None:
    before, start = _balances(devchain, 3), devchain.w3.eth.block_number + 1
    prompt = "write a haiku about ledgers"  # 5 prompt tokens
    response, receipt = _pay(usage_gateway, devchain, 3, "/complete", {"prompt": prompt, "max_tokens": 7})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == 12
    charged = 1_000 + 12 * 10  # base + 12 tokens at 0.00001
    assert receipt.success and receipt.amount == str(charged)
    assert receipt.extra["charge"] == {"basis": "usage", "units": "12", "amount": str(charged), "maximum": "5000", "capped": False}
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == charged and upto_maximum(row) == 5_000
    gas = devchain.w3.eth.get_transaction_receipt(row.tx_hash)["gasUsed"]  # type: ignore[arg-type]
    assert row.gas_used == gas  # the settlement key's gas is on the row (revenue net of gas)
    assert _moved(devchain, 3, before) == (charged, charged)
    # The signed receipt says both too, and is the one the stored row gives later.
    signed = decode_signed_receipt(response.headers["x402gw-receipt"])
    assert (signed["payload"]["amount"], signed["payload"]["maxAmount"]) == (str(charged), "5000")
    assert signed == ReceiptSigner.from_key(DEV_RECEIPT_KEY).receipt(row)
    [exported] = iter_rows(usage_gateway.ledger, Filters())  # finance sees both: what was signed, what was charged
    assert (exported["amount_atomic"], exported["upto_maximum_atomic"], exported["upto_maximum"]) == (str(charged), "5000", "0.005")
    code, report = run_reconcile(usage_gateway, start)
    assert code == 0 and (report["matched"], report["amount_mismatch"]) == (1, []), report


def test_usage_above_the_maximum_settles_the_maximum_and_says_it_was_capped(
    usage_gateway: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream],
) -> None:
    before = _balances(devchain, 4)
    response, receipt = _pay(usage_gateway, devchain, 4, "/by-header/header-25")  # 25 units: 0.025 > 0.01
    assert response.status_code == 200, response.text
    assert receipt.extra["charge"]["capped"] is True and receipt.extra["charge"]["computed"] == "25000"
    assert receipt.amount == str(MAXIMUM)
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == MAXIMUM
    assert _moved(devchain, 4, before) == (MAXIMUM, MAXIMUM)
    assert lying[1].calls["header-25"] == 1


def test_zero_usage_settles_nothing_and_says_so(usage_gateway: RunningGateway, devchain: Devchain) -> None:
    before = _balances(devchain, 5)
    response, receipt = _pay(usage_gateway, devchain, 5, "/metered/json-0")
    assert response.status_code == 200 and response.json()["served"].startswith("USAGE-CONTENT-")
    assert receipt.success and receipt.amount == "0" and not receipt.transaction
    assert receipt.extra["charge"]["units"] == "0" and receipt.extra["charge"]["amount"] == "0"
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 0 and row.tx_hash is None
    assert _moved(devchain, 5, before) == (0, 0)


@pytest.mark.parametrize(("mode", "reason"), [
    ("missing", "usage_missing"), ("string", "usage_not_a_number"), ("negative", "usage_negative"),
    ("fraction", "usage_fractional"), ("huge", "usage_too_large"), ("notjson", "usage_missing"),
])
def test_an_answer_without_a_readable_usage_is_withheld_and_nothing_is_charged(
    usage_gateway: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream], mode: str, reason: str,
) -> None:
    before, calls = _balances(devchain, 6), lying[1].calls[mode]
    response, _ = _pay(usage_gateway, devchain, 6, f"/metered/{mode}")
    assert response.status_code == 502, response.text
    body = response.json()
    assert (body["error"], body["reason"]) == ("usage_unreadable", reason)
    assert "USAGE-CONTENT-" not in response.text  # fail closed: the upstream's content is not served
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.error_reason == reason
    assert _moved(devchain, 6, before) == (0, 0)
    assert lying[1].calls[mode] == calls + 1


def test_a_declared_default_is_charged_when_the_answer_says_nothing(
    usage_gateway: RunningGateway, devchain: Devchain,
) -> None:
    before = _balances(devchain, 7)
    response, receipt = _pay(usage_gateway, devchain, 7, "/or-two/string")
    assert response.status_code == 200, response.text
    assert receipt.extra["charge"]["defaulted"] is True and receipt.amount == str(2 * EACH)
    assert _moved(devchain, 7, before) == (2 * EACH, 2 * EACH)


def test_budgets_hold_the_maximum_then_keep_only_what_was_charged(
    usage_gateway: RunningGateway, devchain: Devchain,
) -> None:
    # per_payer budget 0.014: each call reserves its 0.01 maximum; with 0.002 charged, the rest
    # goes back, so a second call fits (0.002 + 0.01 <= 0.014); without the release it would not.
    before = _balances(devchain, 8)
    first, _ = _pay(usage_gateway, devchain, 8, "/metered/json-2")
    second, _ = _pay(usage_gateway, devchain, 8, "/metered/json-3")
    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert _moved(devchain, 8, before) == (5 * EACH, 5 * EACH)
    third, _ = _pay(usage_gateway, devchain, 8, "/metered/json-1")  # 0.005 used + 0.01 held > 0.014
    assert third.status_code == 403 and third.json()["error"] == "budget_exceeded"
    assert _moved(devchain, 8, before) == (5 * EACH, 5 * EACH)


def test_one_usage_payment_raced_twice_settles_once(
    usage_gateway: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream],
) -> None:
    with usage_gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/metered/json-4").headers["PAYMENT-REQUIRED"]))
    header = _header(devchain, 2, required)
    before, calls = _balances(devchain, 2), lying[1].calls["json-4"]

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=usage_gateway.url, timeout=30) as http:
            return list(await asyncio.gather(*(http.get("/metered/json-4", headers={"PAYMENT-SIGNATURE": header})
                                              for _ in range(3))))

    responses = asyncio.run(race())
    assert 200 in [r.status_code for r in responses], [r.text for r in responses]
    assert all(r.status_code in (200, 409) for r in responses), [r.text for r in responses]
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 4 * EACH
    assert _moved(devchain, 2, before) == (4 * EACH, 4 * EACH)
    assert lying[1].calls["json-4"] == calls + 1  # one upstream call for one payment


def test_the_typescript_client_pays_a_usage_charge(usage_gateway: RunningGateway, devchain: Devchain) -> None:
    """@x402/fetch with @x402/evm's upto client (2.27): the same usage charge, settled once."""
    before = _balances(devchain, 1)
    summary = ts_pay(f"{usage_gateway.url}/metered/json-6", devchain.key(1), allow=[("eip155:31337", devchain.token)])
    assert summary["exit"] == 0 and summary["status"] == 200, summary
    assert summary["chosen"]["scheme"] == "upto"
    receipt = summary["paymentResponse"]
    assert receipt["success"] is True and receipt["amount"] == str(6 * EACH)
    assert receipt["extra"]["charge"]["units"] == "6"
    [row] = usage_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 6 * EACH
    assert _moved(devchain, 1, before) == (6 * EACH, 6 * EACH)


OFFERED = """
catalog: 1
owner: acme-offers
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  legacy:
    base_url: "{legacy}"
tools:
  - name: get_quote
    description: Latest price of a ticker, exact or upto.
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.002
    max_price: 0.01
    offers:
      - {{asset: "{token}", scheme: upto}}
    input_schema: {{type: object, properties: {{symbol: {{type: string}}}}, required: [symbol]}}
"""


def test_upto_as_a_further_offer_signs_for_the_maximum_and_settles_the_price(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str,
) -> None:
    path = tmp_path / "offers.yaml"
    path.write_text(OFFERED.format(token=devchain.token, pay_to=PAY_TO, legacy=upstream))
    gateway = start_gateway(path)
    with gateway.client() as http:
        accepts = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))["accepts"]
    assert [(a["scheme"], a["amount"]) for a in accepts] == [("exact", "2000"), ("upto", str(MAXIMUM))]
    before = _balances(devchain, 2)
    response, receipt = _pay(gateway, devchain, 2, "/quotes/ACME")  # the SDK's upto client takes the upto offer
    assert response.status_code == 200 and receipt.amount == "2000", response.text
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 2000 and upto_maximum(row) == MAXIMUM
    assert _moved(devchain, 2, before) == (2000, 2000)


def test_a_soap_tool_is_charged_by_an_element_of_its_answer(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str, warehouse: str,
    bridge_secrets: dict[str, str],
) -> None:
    """from: element: the units are an element of the SOAP answer (here <Reserved>, per reserved
    item), read where the bridge put it in the JSON it serves."""
    catalog = warehouse_catalog(tmp_path, upstream, warehouse, replace={
        '    upstream: warehouse\n    price: "0.002"\n    kind: soap\n    retry: true  # a read: safe to retry although SOAP is POST':
        '    upstream: warehouse\n    price: "0.0001"\n    max_price: "0.01"\n    payment: {scheme: upto}\n'
        '    usage: {from: element, element: Reserved}\n    kind: soap\n    retry: true',
    })
    gateway = start_gateway(catalog)
    before = _balances(devchain, 5)
    response, receipt = _pay(gateway, devchain, 5, "/warehouse/stock/BLT-100")
    assert response.status_code == 200, response.text
    reserved = int(response.json()["reserved"])
    assert receipt.extra["charge"]["units"] == str(reserved) and receipt.amount == str(reserved * 100)
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == reserved * 100
    assert _moved(devchain, 5, before) == (reserved * 100, reserved * 100)


def test_a_usage_payment_re_targeted_to_another_request_is_refused_with_nothing_moved(
    usage_gateway: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream],
) -> None:
    """A payment signed for one call (1 unit) replayed on a dearer one (9 units), and a junk
    signature over its public payer and nonce: both refused before any upstream call or charge."""
    with usage_gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/metered/json-1").headers["PAYMENT-REQUIRED"]))
    header = _header(devchain, 4, required)
    junk = json.loads(base64.b64decode(header))
    junk["payload"]["signature"] = "0x" + "11" * 65
    before, calls = _balances(devchain, 4), (lying[1].calls["json-9"], lying[1].calls["json-1"])
    with usage_gateway.client() as http:
        moved = http.get("/metered/json-9", headers={"PAYMENT-SIGNATURE": header})
        forged = http.get("/metered/json-1", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(junk).encode()).decode()})
    assert moved.status_code == 402 and forged.status_code == 402, (moved.text, forged.text)
    assert forged.json()["error"] == "invalid_permit2_signature"
    assert (lying[1].calls["json-9"], lying[1].calls["json-1"]) == calls
    assert _moved(devchain, 4, before) == (0, 0)
    assert all(row.state != PaymentState.SETTLED for row in usage_gateway.ledger.all())
