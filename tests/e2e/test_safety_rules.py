"""The safety rules end to end, one gateway on a real anvil: exposure (never an open proxy, no
redirect followed or charged, headers stripped both ways), validation before any price, size
limits, kill switches, payer lists and the circuit breaker. None of them ever charges."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    RunningGateway,
    body_json,
    offer_of,
    upstream_hits,
)

PAYER = 3


def pay(client: httpx.Client, devchain: Devchain, method: str, path: str, *, payer: int = PAYER,
        headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[httpx.Response, httpx.Response, str]:
    """Unpaid call → 402 → signed payment → paid call, with extra headers on both calls."""
    challenge = client.request(method, path, headers=headers, **kwargs)
    offer = offer_of(challenge)
    header = encode_header(Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource))
    paid = client.request(method, path, headers={**(headers or {}), "PAYMENT-SIGNATURE": header}, **kwargs)
    return challenge, paid, header


class Hits:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.fail = False


def hostile_upstream(hits: Hits, elsewhere: str) -> Starlette:
    """An upstream that tries everything: sensitive headers, redirects off-host, huge answers."""

    async def echo(request: Request) -> Response:
        hits.counts["echo"] += 1
        return JSONResponse(
            {"headers": {k.lower(): v for k, v in request.headers.items()}},
            headers={"Set-Cookie": "session=upstream-secret", "Server": "LegacyServer/1.0",
                     "Proxy-Authenticate": 'Basic realm="x"', "Keep-Alive": "timeout=5", "X-Kept": "yes"},
        )

    async def hop(request: Request) -> Response:
        hits.counts["hop"] += 1
        return RedirectResponse(f"{elsewhere}/steal", status_code=302)

    async def big(request: Request) -> Response:
        hits.counts["big"] += 1
        return Response(b"x" * 5000, media_type="application/octet-stream")

    async def flaky(request: Request) -> Response:
        hits.counts["flaky"] += 1
        if hits.fail:
            return JSONResponse({"error": "down"}, status_code=500)
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/echo", echo), Route("/hop", hop), Route("/big", big), Route("/flaky", flaky),
    ])


def elsewhere_app(hits: Hits) -> Starlette:
    async def anything(request: Request) -> Response:
        hits.counts[request.url.path] += 1
        return JSONResponse({"stolen": True})

    return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST", "CONNECT"])])


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[tuple[str, Hits]]:
    hits = Hits()
    with ThreadServer(elsewhere_app(hits)) as server:
        yield server.url, hits


@pytest.fixture(scope="module")
def hostile(elsewhere: tuple[str, Hits]) -> Iterator[tuple[str, Hits]]:
    hits = Hits()
    with ThreadServer(hostile_upstream(hits, elsewhere[0])) as server:
        yield server.url, hits


HOSTILE_CATALOG = """\
catalog: 1
owner: hostile-test
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
upstreams:
  hostile:
    base_url: "{url}"
  flaky:
    base_url: "{url}"
    breaker: {{failures: 2, window_seconds: 86400, cooldown_seconds: 1}}
tools:
  - {{name: echo, description: Echo, method: GET, path: /echo, upstream: hostile, price: "0.001"}}
  - {{name: hop, description: Redirects, method: GET, path: /hop, upstream: hostile, price: "0.001"}}
  - {{name: big, description: Too big, method: GET, path: /big, upstream: hostile, price: "0.001"}}
  - {{name: flaky, description: Fails on demand, method: GET, path: /flaky, upstream: flaky, price: "0.001"}}
"""


@pytest.fixture
def hostile_gateway(
    start_gateway: Callable[..., RunningGateway], devchain: Devchain, hostile: tuple[str, Hits], tmp_path: Path
) -> Callable[..., RunningGateway]:
    url, hits = hostile
    hits.counts.clear()
    hits.fail = False
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_CATALOG.format(token=devchain.token, pay_to=PAY_TO, url=url))

    def start(**overrides: Any) -> RunningGateway:
        return start_gateway(path, **overrides)

    return start


def raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (httpx would normalise the target) and read the status line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        while True:  # the rest, until the server closes (Connection: close)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def assert_nothing_charged(gateway: RunningGateway, devchain: Devchain, pay_to_before: int) -> None:
    assert devchain.balance(PAY_TO) == pay_to_before
    assert all(row.state != PaymentState.SETTLED for row in gateway.ledger.all())


# -- exposure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    b"http://{elsewhere}/quotes/AAPL",  # absolute-form: the host in it is never used
    b"/quotes/../admin/users",
    b"/quotes/AAPL/../../admin/users",
    b"/quotes/%2e%2e/admin/users",
    b"/quotes/AAPL%2F..%2F..%2Fadmin%2Fusers",
    b"//quotes/AAPL",
    b"//admin/users",
    b"/admin/users",
    b"/internal/health",
    b"/api/v1/quote/AAPL",
])
def test_the_gateway_is_never_an_open_proxy(
    gateway: RunningGateway, upstream: str, elsewhere: tuple[str, Hits], target: bytes
) -> None:
    elsewhere_url, elsewhere_hits = elsewhere
    elsewhere_hits.counts.clear()
    target = target.replace(b"{elsewhere}", elsewhere_url.removeprefix("http://").encode())
    status, answer = raw(gateway.url, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    # a listed route is offered for its catalog price (402), anything else is not there (404/400)
    assert status in (400, 402, 404), answer
    assert sum(elsewhere_hits.counts.values()) == 0
    assert upstream_hits(upstream, "GET /admin/users") == 0
    assert upstream_hits(upstream, "GET /internal/health") == 0
    assert httpx.get(f"{upstream}/stats").json()["total"] == 0  # an unpaid request never reaches it


def test_connect_and_a_hostile_host_header_reach_only_the_catalog_upstream(
    gateway: RunningGateway, devchain: Devchain, upstream: str, elsewhere: tuple[str, Hits]
) -> None:
    elsewhere_url, elsewhere_hits = elsewhere
    elsewhere_hits.counts.clear()
    authority = elsewhere_url.removeprefix("http://").encode()
    status, _ = raw(gateway.url, b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\nConnection: close\r\n\r\n")
    assert status in (400, 404, 405)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/HOST", payer=PAYER, headers={"Host": authority.decode()})
    assert paid.status_code == 200, paid.text
    assert upstream_hits(upstream, "GET /api/v1/quote/HOST") == 1
    assert sum(elsewhere_hits.counts.values()) == 0


def test_redirects_are_a_502_never_followed_and_never_charged(
    hostile_gateway: Callable[..., RunningGateway], devchain: Devchain, hostile: tuple[str, Hits],
    elsewhere: tuple[str, Hits],
) -> None:
    gateway = hostile_gateway()
    elsewhere_url, elsewhere_hits = elsewhere
    elsewhere_hits.counts.clear()
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/hop", payer=PAYER)
    # A 3xx is not the content paid for: normalised, nothing of it (body, Location) passed on.
    assert paid.status_code == 502 and paid.json()["error"] == "upstream_redirect", paid.text
    assert paid.json()["upstreamStatus"] == 302 and "location" not in paid.headers
    assert elsewhere_url not in paid.text
    assert "payment-response" not in paid.headers
    assert hostile[1].counts["hop"] == 1 and sum(elsewhere_hits.counts.values()) == 0
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.error_reason == "upstream_redirect"
    assert_nothing_charged(gateway, devchain, before)


def test_sensitive_and_hop_by_hop_headers_are_stripped_both_ways(
    hostile_gateway: Callable[..., RunningGateway], devchain: Devchain
) -> None:
    gateway = hostile_gateway()
    sent = {
        "Cookie": "session=agent-secret", "Authorization": "Bearer agent-secret",
        "Proxy-Authorization": "Basic c2VjcmV0", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example",
        "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6", "Proxy-Connection": "keep-alive", "TE": "trailers",
        "X-Api-Key": "agent-key", "Accept": "application/json",
    }
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/echo", payer=PAYER, headers=sent)
    assert paid.status_code == 200, paid.text
    seen = paid.json()["headers"]
    for name in ("cookie", "authorization", "proxy-authorization", "x-forwarded-for", "x-forwarded-host",
                 "x-real-ip", "forwarded", "proxy-connection", "te", "x-api-key",
                 "payment-signature", "x-payment"):
        assert name not in seen, name
    assert seen["accept"] == "application/json"
    assert seen["host"] != "evil.example"
    for name in ("set-cookie", "proxy-authenticate", "keep-alive"):
        assert name not in paid.headers, name
    assert paid.headers.get("server") != "LegacyServer/1.0"
    assert paid.headers["x-kept"] == "yes"
    assert paid.headers["cache-control"] == "private, no-store"


# -- validation before any price -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "kwargs", "field"), [
    ("GET", "/quotes/aapl", {}, "symbol"),  # path parameter
    ("GET", "/weather", {"params": {"city": "Lisbon", "units": "kelvin"}}, "units"),  # query
    ("GET", "/weather", {}, "(arguments)"),  # a required query argument missing
    ("POST", "/orders", {"json": {"symbol": "ACME", "quantity": 0}}, "quantity"),  # JSON body
    ("POST", "/orders", {"json": {"symbol": "ACME", "quantity": 1, "extra": True}}, "(arguments)"),
])
def test_invalid_arguments_get_422_before_any_402_for_every_tool_kind(
    gateway: RunningGateway, devchain: Devchain, upstream: str, method: str, path: str, kwargs: dict[str, Any], field: str
) -> None:
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        unpaid = client.request(method, path, **kwargs)
        # even with a payment attached, nothing is verified or charged for a call that cannot succeed
        header = encode_header({"x402Version": 2, "payload": {}, "accepted": {}})
        with_payment = client.request(method, path, headers={"PAYMENT-SIGNATURE": header}, **kwargs)
    for response in (unpaid, with_payment):
        assert response.status_code == 422, response.text
        assert "payment-required" not in response.headers
        assert body_json(response)["error"] == "invalid_arguments"
        assert field in [f["field"] for f in body_json(response)["fields"]]
    assert httpx.get(f"{upstream}/stats").json()["total"] == 0
    assert gateway.ledger.all() == [] and devchain.balance(PAY_TO) == before


# -- size limits ---------------------------------------------------------------------------------


def test_oversized_request_headers_and_bodies_are_refused_without_a_price(
    start_gateway: Callable[..., RunningGateway], devchain: Devchain
) -> None:
    gateway = start_gateway(max_header_bytes=2048, max_body_bytes=512)
    with gateway.client() as client:
        headers = client.get("/quotes/AAPL", headers={"X-Padding": "p" * 3000})
        body = client.post("/orders", content=b'{"symbol": "ACME", "quantity": 1, "pad": "' + b"p" * 1000 + b'"}',
                           headers={"Content-Type": "application/json"})
        small = client.get("/quotes/AAPL", headers={"X-Padding": "p" * 100})
    assert headers.status_code == 431 and body_json(headers)["error"] == "request_headers_too_large"
    assert body.status_code == 413 and body_json(body)["error"] == "request_too_large"
    for refused in (headers, body):
        assert "payment-required" not in refused.headers
    assert small.status_code == 402


def test_an_upstream_answer_over_the_limit_is_a_502_and_never_a_charge(
    hostile_gateway: Callable[..., RunningGateway], devchain: Devchain
) -> None:
    gateway = hostile_gateway(max_upstream_response_bytes=1000)
    payer_before, before = devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/big", payer=PAYER)
    assert paid.status_code == 502 and body_json(paid)["error"] == "upstream_response_too_large"
    assert "payment-response" not in paid.headers
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.error_reason == "upstream_response_too_large"
    assert_nothing_charged(gateway, devchain, before)
    assert devchain.balance(devchain.address(PAYER)) == payer_before


# -- kill switches and payer lists -----------------------------------------------------------------


def test_kill_switch_through_the_admin_endpoint_stops_offers_and_paid_calls(
    start_gateway: Callable[..., RunningGateway], devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(admin_token="admin-secret")
    auth = {"Authorization": "Bearer admin-secret"}
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/KILL"))
        header = encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))
        switched = client.post("/admin/kill-switch", headers=auth, json={"tool": "get_quote", "disabled": True, "reason": "incident 42"})
        assert switched.status_code == 200, switched.text
        unpaid = client.get("/quotes/KILL")
        paid = client.get("/quotes/KILL", headers={"PAYMENT-SIGNATURE": header})
        other_tool = client.get("/weather", params={"city": "Lisbon"})
        client.post("/admin/kill-switch", headers=auth, json={"owner": "acme-legacy", "disabled": True})
        owner_off = client.get("/weather", params={"city": "Lisbon"})
        client.post("/admin/kill-switch", headers=auth, json={"owner": "acme-legacy", "disabled": False})
        client.post("/admin/kill-switch", headers=auth, json={"tool": "get_quote", "disabled": False})
        back = client.get("/quotes/KILL")
    for refused in (unpaid, paid, owner_off):
        assert refused.status_code == 503, refused.text
        assert body_json(refused)["error"] == "tool_disabled" and body_json(refused)["retryable"] is False
        assert "payment-required" not in refused.headers
    assert "incident 42" in body_json(unpaid)["message"]
    assert other_tool.status_code == 402 and back.status_code == 402
    assert upstream_hits(upstream, "GET /api/v1/quote/KILL") == 0
    assert gateway.ledger.all() == [] and devchain.balance(PAY_TO) == before


def test_denied_payer_is_refused_before_verify_and_never_charged(
    start_gateway: Callable[..., RunningGateway], devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"deny_payers": [devchain.address(PAYER)]}))
    gateway = start_gateway(policy_file=policy)
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        challenge, paid, _ = pay(client, devchain, "GET", "/quotes/DENY", payer=PAYER)
        _, allowed, _ = pay(client, devchain, "GET", "/quotes/OKAY", payer=PAYER + 1)
    assert challenge.status_code == 402
    assert paid.status_code == 403 and body_json(paid)["error"] == "payer_denied"
    assert allowed.status_code == 200
    assert upstream_hits(upstream, "GET /api/v1/quote/DENY") == 0
    assert [row.payer for row in gateway.ledger.all()] == [devchain.address(PAYER + 1)]
    assert devchain.balance(PAY_TO) - before == 2000


# -- circuit breaker -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], what: str, attempts: int = 200) -> Any:
    """Poll real state, bounded; each pause waits on an Event rather than sleeping."""
    pause = threading.Event()
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        pause.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_open_breaker_answers_503_without_an_offer_then_a_probe_closes_it(
    hostile_gateway: Callable[..., RunningGateway], devchain: Devchain, hostile: tuple[str, Hits]
) -> None:
    gateway = hostile_gateway()
    hits = hostile[1]
    hits.fail = True
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        for _ in range(2):
            _, failed, _ = pay(client, devchain, "GET", "/flaky", payer=PAYER)
            assert failed.status_code == 500
        offer = offer_of(client.get("/echo"))  # another upstream: still on sale
        opened = client.get("/flaky")
        assert opened.status_code == 503, opened.text
        assert body_json(opened)["error"] == "upstream_circuit_open"
        assert "payment-required" not in opened.headers
        assert 1 <= int(opened.headers["retry-after"]) <= 1
        assert hits.counts["flaky"] == 2
        hits.fail = False
        # after the cool-down (1 s) the breaker is half-open: offers again, and one paid probe
        wait_for(lambda: client.get("/flaky").status_code == 402, "the breaker to half-open")
        _, probe, _ = pay(client, devchain, "GET", "/flaky", payer=PAYER)
        assert probe.status_code == 200, probe.text
        # closed again: one failure is not enough to re-open it
        hits.fail = True
        _, failed, _ = pay(client, devchain, "GET", "/flaky", payer=PAYER)
        assert failed.status_code == 500
        assert client.get("/flaky").status_code == 402
    assert offer.accepts
    settled = [row for row in gateway.ledger.all() if row.state == PaymentState.SETTLED]
    assert len(settled) == 1 and devchain.balance(PAY_TO) - before == 1000
