"""Answers sized to a budget and schema drift (issue 17 items 3-4), on the real stack: anvil, the
gateway on loopback, a real upstream on loopback that logs every call, the ledger and the audit trail.

Trimming: a projection, an item limit and a token budget cut the answer as asked and
X402GW-Trimmed says what; the upstream never sees the x402gw_* parameters. A malformed projection
is a 400 naming the position, before any 402, and nothing is charged even with a payment attached.
Drift: under fail nothing is charged (settle-after: balances unchanged, the row voided) or a refund
is owed (upfront) and the answer is never served or replayed; under pass it is charged and recorded.
Attacks: a payment made for one projection sent with another, or replayed with another, buys nothing
more; the price is the same whatever is asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.audit import AuditTrail, AuditWriter
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of

PAYER = 6
PRICE = 2000  # "0.002" at 6 decimals
ITEMS = [{"name": f"item{i}", "price": i + 0.5, "tags": ["a", "b", "c"], "blurb": "x" * 40} for i in range(10)]
DRIFT = {
    "ok": {"name": "bolt", "price": 1.25},
    "missing": {"price": 1.25},  # a required field removed
    "type": {"name": "bolt", "price": "one twenty-five"},  # a type changed
}


class Upstream:
    """A real HTTP upstream that logs each call (path and query) and answers from fixed data."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

        async def log(request: Request) -> None:
            with self.lock:
                self.calls.append((request.method, request.url.path, request.url.query))

        async def items(request: Request) -> JSONResponse:
            await log(request)
            return JSONResponse({"items": ITEMS, "total": len(ITEMS)}, headers={"ETag": '"v1"'})

        async def drift(request: Request) -> JSONResponse:
            await log(request)
            status = 201 if request.method == "POST" else 200
            return JSONResponse(DRIFT[request.path_params["kind"]], status_code=status)

        self.app = Starlette(routes=[
            Route("/items", items), Route("/drift/{kind}", drift, methods=["GET", "POST"]),
        ])

    def hits(self, path: str) -> int:
        return sum(1 for _, called, _ in self.calls if called == path)


CATALOG = """
catalog: 1
owner: answers-suite
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  up: {{base_url: "{upstream}", timeout_seconds: 5}}
tools:
  - name: list_items
    description: Every item, with prices and tags
    method: GET
    path: /items
    price: "0.002"
    input_schema: {{type: object, properties: {{category: {{type: string}}}}, additionalProperties: false}}
    answers: {{trim: true}}
  - name: plain_items
    description: Every item, always in full
    method: GET
    path: /plain
    upstream_path: /items
    price: "0.002"
  - name: strict_item
    description: One item; an answer off its schema is not served
    method: GET
    path: /strict/{{kind}}
    upstream_path: /drift/{{kind}}
    price: "0.002"
    input_schema: &kind {{type: object, properties: {{kind: {{type: string}}}}, required: [kind]}}
    output_schema: &item
      type: object
      properties: {{name: {{type: string}}, price: {{type: number}}}}
      required: [name, price]
    answers: {{drift: fail}}
  - name: lenient_item
    description: One item; an answer off its schema is served and recorded
    method: GET
    path: /lenient/{{kind}}
    upstream_path: /drift/{{kind}}
    price: "0.002"
    input_schema: *kind
    output_schema: *item
    answers: {{drift: pass}}
  - name: strict_order
    description: An order (settled before the call); an answer off its schema is refunded
    method: POST
    path: /orders/{{kind}}
    upstream_path: /drift/{{kind}}
    price: "0.002"
    input_schema: *kind
    output_schema: *item
    answers: {{drift: fail}}
"""

ADMIN_TOKEN = "answers-test-admin-token-0123456789"


@pytest.fixture(scope="module")
def upstream_log() -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream()
    with ThreadServer(upstream.app) as server:
        yield upstream, server.url


class Stack:
    def __init__(self, gateway: RunningGateway, upstream: Upstream, writer: AuditWriter, devchain: Devchain) -> None:
        self.gateway, self.upstream, self.writer, self.devchain = gateway, upstream, writer, devchain
        self.payer = devchain.address(PAYER)

    def client(self) -> httpx.Client:
        return self.gateway.client()

    def sign(self, client: httpx.Client, method: str, target: str, **kwargs: Any) -> tuple[httpx.Response, str]:
        challenge = client.request(method, target, **kwargs)
        offer = offer_of(challenge)
        payment = Payer(self.devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource)
        return challenge, encode_header(payment)

    def pay(self, method: str, target: str, **kwargs: Any) -> tuple[httpx.Response, str]:
        with self.client() as client:
            _, header = self.sign(client, method, target, **kwargs)
            return client.request(method, target, headers={"PAYMENT-SIGNATURE": header}, **kwargs), header

    def balances(self) -> tuple[int, int]:
        return self.devchain.balance(self.payer), self.devchain.balance(PAY_TO)

    def events(self, response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
        assert self.writer.drain(30)
        return [(r.event, json.loads(r.data)) for r in self.writer.trail.for_request(response.headers["x-request-id"])]

    def dashboard_drift(self, tool: str) -> int:
        """The dashboard's per-tool schema drift (``/admin/data.json``), and its page's column."""
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with self.client() as client:
            data, page = client.get("/admin/data.json", headers=auth), client.get("/admin", headers=auth)
        assert data.status_code == 200 and "schema drift" in page.text, (data.text, page.status_code)
        [entry] = [t for t in data.json()["tools"] if t["tool"] == tool]
        return int(entry["sinceStart"]["schemaDrift"])

    def drift_metric(self, tool: str, handling: str) -> float:
        with self.client() as client:
            text = client.get("/metrics").text
        prefix = f'x402gw_upstream_schema_drift_total{{handling="{handling}",tool="{tool}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.fixture
def stack(tmp_path: Path, devchain: Devchain, start_gateway: GatewayFactory,
          upstream_log: tuple[Upstream, str]) -> Stack:
    upstream, url = upstream_log
    upstream.calls.clear()
    catalog = tmp_path / "answers.yaml"
    catalog.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=url))
    database_url = f"sqlite:///{tmp_path / 'answers.sqlite3'}"
    writer = AuditWriter(AuditTrail(database_url))
    gateway = start_gateway(catalog, database_url=database_url, app_options={"audit": writer}, admin_token=ADMIN_TOKEN)
    return Stack(gateway, upstream, writer, devchain)


# -- trimming -------------------------------------------------------------------------------------


def test_a_projection_keeps_only_what_was_asked_and_says_so(stack: Stack) -> None:
    before = stack.balances()
    paid, _ = stack.pay("GET", "/items?category=tools&x402gw_fields=items[*].{name: name, price: price}")
    assert paid.status_code == 200, paid.text
    assert paid.json() == [{"name": item["name"], "price": item["price"]} for item in ITEMS]
    assert paid.headers["x402gw-trimmed"] == "fields"
    assert "etag" not in paid.headers  # it described the upstream's bytes, not these
    assert stack.balances() == (before[0] - PRICE, before[1] + PRICE)  # the same price as a whole answer
    # The upstream got the tool's arguments and none of the gateway's parameters.
    assert stack.upstream.calls == [("GET", "/items", "category=tools")]


def test_an_item_limit_cuts_every_array_and_says_how_much(stack: Stack) -> None:
    paid, _ = stack.pay("GET", "/items?x402gw_max_items=2")
    assert paid.status_code == 200, paid.text
    body = paid.json()
    assert body["items"] == [{**item, "tags": ["a", "b"]} for item in ITEMS[:2]] and body["total"] == 10
    # items (10 → 2) and the two kept items' tags (3 → 2); the eight dropped items' tags went with them
    assert paid.headers["x402gw-trimmed"] == "max-items=2;arrays=3;dropped=10"


def test_a_token_budget_cuts_arrays_until_the_answer_fits(stack: Stack) -> None:
    paid, _ = stack.pay("GET", "/items?x402gw_token_budget=60&x402gw_fields=items")
    assert paid.status_code == 200, paid.text
    tokens = -(-len(paid.content) // 3)
    assert tokens <= 60 < -(-len(json.dumps(ITEMS, separators=(",", ":"))) // 3)
    kept = paid.json()
    assert 1 <= len(kept) < len(ITEMS) and kept[0]["name"] == "item0"
    trimmed = paid.headers["x402gw-trimmed"]
    assert trimmed.startswith("fields, token-budget=60;items=") and trimmed.endswith(f";tokens={tokens}")


def test_a_replay_of_a_trimmed_answer_is_the_same_answer(stack: Stack) -> None:
    target = "/items?x402gw_max_items=1"
    first, header = stack.pay("GET", target)
    with stack.client() as client:
        again = client.get(target, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200 and again.headers["x402gw-replay"] == "true"
    assert again.content == first.content and again.headers["x402gw-trimmed"] == first.headers["x402gw-trimmed"]
    assert stack.upstream.hits("/items") == 1


@pytest.mark.parametrize(("query", "code", "position"), [
    ("x402gw_fields=items[*].{name: name", "answer_fields_invalid", 20),
    ("x402gw_fields=items[*].name)", "answer_fields_invalid", 13),
    ("x402gw_fields=length(items)", "answer_fields_invalid", 0),
    ("x402gw_max_items=-1", "answer_limit_invalid", None),
    ("x402gw_token_budget=lots", "answer_limit_invalid", None),
    ("x402gw_colour=red", "answer_parameter_invalid", None),
])
def test_malformed_trimming_is_a_400_before_any_402_and_costs_nothing(
    stack: Stack, query: str, code: str, position: int | None
) -> None:
    before = stack.balances()
    with stack.client() as client:
        unpaid = client.get(f"/items?{query}")
        # A payment signed for the well-formed call, sent with the malformed parameters.
        _, header = stack.sign(client, "GET", "/items")
        paid = client.get(f"/items?{query}", headers={"PAYMENT-SIGNATURE": header})
    for response in (unpaid, paid):
        assert response.status_code == 400, response.text
        assert "payment-required" not in response.headers
        body = response.json()
        assert body["error"] == code and body["next"]["action"] == "fix_arguments"
        if position is not None:
            assert body["position"] == position and body["parameter"] == "x402gw_fields"
    assert stack.balances() == before
    assert stack.gateway.ledger.all() == []
    assert stack.upstream.calls == []


def test_a_tool_without_trimming_refuses_the_parameters_and_never_forwards_them(stack: Stack) -> None:
    with stack.client() as client:
        response = client.get("/plain?x402gw_max_items=1")
    assert response.status_code == 400 and response.json()["error"] == "answer_trimming_not_offered"
    paid, _ = stack.pay("GET", "/plain")
    assert paid.status_code == 200 and len(paid.json()["items"]) == 10 and "x402gw-trimmed" not in paid.headers


def test_discovery_advertises_the_parameters_only_for_tools_that_take_them(stack: Stack) -> None:
    with stack.client() as client:
        tools = {entry["function"]["name"]: entry["function"]["parameters"] for entry in client.get("/tools").json()["tools"]}
        openapi = client.get("/openapi.json").json()
    assert {"x402gw_fields", "x402gw_max_items", "x402gw_token_budget", "category"} <= set(tools["list_items"]["properties"])
    assert not any(name.startswith("x402gw_") for name in tools["plain_items"].get("properties", {}))
    parameters = {p["name"]: p["in"] for p in openapi["paths"]["/items"]["get"]["parameters"]}
    assert parameters["x402gw_fields"] == "query" and "x402gw_token_budget" in parameters
    assert "X402GW-Trimmed" in openapi["paths"]["/items"]["get"]["responses"]["2XX"]["headers"]


# -- the attack: trimming parameters against the price and the payment's binding ----------------


def test_trimming_never_changes_the_price(stack: Stack) -> None:
    with stack.client() as client:
        amounts = {
            target: offer_of(client.get(target)).accepts[0].amount
            for target in ("/items", "/items?x402gw_max_items=0", "/items?x402gw_fields=total", "/items?x402gw_token_budget=1")
        }
    assert set(amounts.values()) == {str(PRICE)}


def test_a_payment_for_one_projection_buys_nothing_with_another(stack: Stack) -> None:
    before = stack.balances()
    with stack.client() as client:
        _, header = stack.sign(client, "GET", "/items?x402gw_fields=total")
        # Sent with another projection: its binding names the request it was made for.
        swapped = client.get("/items?x402gw_fields=items", headers={"PAYMENT-SIGNATURE": header})
        assert swapped.status_code == 402 and swapped.json()["error"] == "payment_requirements_mismatch"
        assert stack.balances() == before and stack.upstream.calls == []
        # Paid as made: one charge, one upstream call, the projection asked.
        paid = client.get("/items?x402gw_fields=total", headers={"PAYMENT-SIGNATURE": header})
        assert paid.status_code == 200 and paid.json() == 10
        # The same payment replayed with another projection (and with none): not the stored answer,
        # not a second charge, not a second upstream call.
        for target in ("/items?x402gw_fields=items", "/items"):
            again = client.get(target, headers={"PAYMENT-SIGNATURE": header})
            assert again.status_code in (402, 409), again.text
            assert "x402gw-replay" not in again.headers and b"item0" not in again.content
    assert stack.balances() == (before[0] - PRICE, before[1] + PRICE)
    assert stack.upstream.hits("/items") == 1
    [row] = stack.gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == PRICE


# -- schema drift ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "type"])
def test_drift_under_fail_is_not_served_and_not_charged(stack: Stack, kind: str) -> None:
    before = stack.balances()
    paid, _ = stack.pay("GET", f"/strict/{kind}")
    assert paid.status_code == 502, paid.text
    body = paid.json()
    assert body["error"] == "upstream_schema_drift" and "payment-response" not in paid.headers
    assert "bolt" not in paid.text and "twenty-five" not in paid.text  # nothing of the answer
    assert body["problems"][0]["keyword"] == ("required" if kind == "missing" else "type")
    assert stack.balances() == before
    [row] = stack.gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.tx_hash is None
    assert stack.upstream.hits(f"/drift/{kind}") == 1
    events = dict(stack.events(paid))
    assert events["upstream_schema_drift"]["handling"] == "fail"
    assert stack.drift_metric("strict_item", "fail") == 1
    assert stack.dashboard_drift("strict_item") == 1  # the dashboard's per-tool panel counts it


def test_an_answer_on_its_schema_is_served_and_charged(stack: Stack) -> None:
    before = stack.balances()
    paid, _ = stack.pay("GET", "/strict/ok")
    assert paid.status_code == 200 and paid.json() == DRIFT["ok"]
    assert stack.balances() == (before[0] - PRICE, before[1] + PRICE)
    assert "upstream_schema_drift" not in dict(stack.events(paid))
    assert stack.drift_metric("strict_item", "fail") == 0


def test_drift_under_pass_is_charged_and_recorded(stack: Stack) -> None:
    before = stack.balances()
    paid, _ = stack.pay("GET", "/lenient/type")
    assert paid.status_code == 200 and paid.json() == DRIFT["type"]
    assert stack.balances() == (before[0] - PRICE, before[1] + PRICE)
    [row] = stack.gateway.ledger.all()
    assert row.state == PaymentState.SETTLED
    events = dict(stack.events(paid))
    assert events["upstream_schema_drift"]["handling"] == "pass"
    assert events["upstream_schema_drift"]["problems"] == [{"at": "/price", "keyword": "type", "problem": "expected number"}]
    assert stack.drift_metric("lenient_item", "pass") == 1
    assert stack.dashboard_drift("lenient_item") == 1


def test_drift_under_fail_after_an_upfront_settlement_is_withheld_and_refunded(stack: Stack) -> None:
    before = stack.balances()
    paid, header = stack.pay("POST", "/orders/missing", json={})
    assert paid.status_code == 502, paid.text
    body = paid.json()
    assert body["error"] == "upstream_schema_drift" and body["refund"] in ("owed", "refunded")
    assert body["refundAmount"] == str(PRICE) and "bolt" not in paid.text
    [row] = stack.gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.refund_owed == PRICE  # charged, and a refund on record
    events = [event for event, _ in stack.events(paid)]
    assert "upstream_schema_drift" in events and "upstream_answer_withheld" in events
    # A resend of the payment: never the withheld answer, never a second charge or call.
    after = stack.balances()
    with stack.client() as client:
        again = client.post("/orders/missing", json={}, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 409 and again.json()["error"] == "payment_already_settled"
    assert again.json()["refundAmount"] == str(PRICE) and "x402gw-replay" not in again.headers
    assert stack.balances() == after and after[0] in (before[0] - PRICE, before[0])
    assert stack.upstream.hits("/drift/missing") == 1
