"""Attacks on the request front: Host, paths, methods, payment headers, CORS, request ids, queries.

A griefer or free-rider sends what no client would: a Host that smuggles a path or is 3 KB long,
encoded or dot-segment paths, unknown methods, garbage or duplicated payment headers, a query
whose repeated keys are reordered after signing. Each must get a clear refusal with a stable code
(never a 5xx or a stack trace), reach no upstream, write no ledger row and move no money; what a
402 names for one Host is never what another Host is told. Run against a real gateway on loopback
(uvicorn), raw sockets where httpx would normalise the request first."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of
from tests.support.forwarding_upstream import Received

PAYER = 6
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
            recorder: tuple[ThreadServer, list[Received]]) -> RunningGateway:
    catalog = tmp_path / "front.yaml"
    catalog.write_text(f"""
catalog: 1
owner: front-test
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{recorder[0].url}", timeout_seconds: 5}}
tools:
  - name: lookup
    description: d
    method: GET
    path: /lookup/{{id}}
    price: "0.001"
    upstream_path: /rec/lookup/{{id}}
    input_schema: {{type: object, properties: {{id: {{type: string, pattern: "^[0-9]+$"}}}}, additionalProperties: false}}
  - name: search
    description: d
    method: GET
    path: /search
    price: "0.001"
    upstream_path: /rec/search
    input_schema:
      type: object
      properties:
        q: {{type: string}}
        tag: {{type: array, items: {{type: string}}}}
      additionalProperties: false
""")
    return start_gateway(catalog)


def raw(gateway: RunningGateway, head: str) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (no client normalisation); status, headers, body."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def refused(status: int, body: bytes, code: str) -> dict[str, Any]:
    """A refusal with its stable code and a next step; no traceback, no exception text."""
    assert status < 500, body
    data = json.loads(body)
    assert data["error"] == code, data
    assert "next" in data and "Traceback" not in body.decode() and "ValidationError" not in body.decode()
    return dict(data)


def untouched(gateway: RunningGateway, received: list[Received]) -> None:
    assert received == []  # no upstream call
    assert gateway.ledger.all() == []  # no payment row


def test_each_host_is_told_its_own_resource_and_no_host_gets_anothers_cached_402(
        gateway: RunningGateway, received: list[Received]) -> None:
    with gateway.client() as client:
        for _ in range(2):  # the second round is the fast path's cache
            for host in ("a.example", "b.example:8443", "127.0.0.1", "[::1]:9", "svc_gateway"):
                answer = client.get("/lookup/7", headers={"Host": host})
                offer = offer_of(answer)
                assert offer.resource.url == f"http://{host}/lookup/7"
                assert answer.headers["cache-control"] == "no-store"  # no shared cache keeps one Host's offer
                assert answer.json()["resource"]["url"] == offer.resource.url
    untouched(gateway, received)


@pytest.mark.parametrize("host", [
    "evil.example/phish?x=", "user@evil.example", "evil.example#", 'evil"><script>', "a" * 3000, "evil.example:80:81",
])
def test_a_host_that_smuggles_a_url_or_overflows_the_offer_is_refused_not_reflected(
        gateway: RunningGateway, received: list[Received], host: str) -> None:
    for _ in range(2):  # cached or not, the same answer
        status, headers, body = raw(gateway, f"GET /lookup/7 HTTP/1.1\r\nHost: {host}\r\n")
        data = refused(status, body, "invalid_resource_url")
        assert status == 400 and "payment-required" not in headers and host not in body.decode()
        assert REQUEST_ID.fullmatch(headers["x-request-id"])
    # A payment header on top changes nothing: still a 400 before any decoding, never a 500.
    status, _, body = raw(gateway, f"GET /lookup/7 HTTP/1.1\r\nHost: {host}\r\nPAYMENT-SIGNATURE: e30=\r\n")
    assert status == 400 and refused(status, body, "invalid_resource_url") == data
    untouched(gateway, received)


def test_a_query_too_long_for_the_offers_resource_is_a_400_paid_or_not(
        gateway: RunningGateway, received: list[Received]) -> None:
    long_query = "/search?q=" + "x" * 2100
    with gateway.client() as client:
        for headers in ({}, {"PAYMENT-SIGNATURE": "e30="}, {"X-PAYMENT": "e30="}):
            answer = client.get(long_query, headers=headers)
            data = refused(answer.status_code, answer.content, "invalid_resource_url")
            assert answer.status_code == 400 and data["limit"] == 2048
        assert client.get("/search?q=" + "x" * 1900).status_code == 402  # under the limit: an offer
    untouched(gateway, received)


@pytest.mark.parametrize(("target", "status", "code"), [
    ("/lookup/1%2F2", 404, "not_found"),
    ("/lookup/%2e%2e/x", 404, "not_found"),
    ("/lookup/1%00", 404, "not_found"),
    ("/lookup/1\\2", 404, "not_found"),
    ("//lookup/1", 404, "not_found"),
    ("/lookup//1", 404, "not_found"),
    ("/lookup/./1", 404, "not_found"),
    ("/x/../lookup/1", 404, "not_found"),
    ("/lookup/1/", 404, "not_found"),
    ("/LOOKUP/1", 404, "not_found"),
    ("/lookup/%31", 402, "payment_required"),  # a plain encoded digit: the same tool, its decoded path bound
    ("/lookup/%EF%BC%91", 422, "invalid_arguments"),  # a fullwidth digit is no digit
    ("/lookup/1;x", 422, "invalid_arguments"),
    ("/lookup/1?id=2", 422, "invalid_arguments"),  # a path parameter again in the query
])
def test_encoded_dotted_and_doubled_paths_reach_no_other_tool(
        gateway: RunningGateway, received: list[Received], target: str, status: int, code: str) -> None:
    for _ in range(2):
        got, headers, body = raw(gateway, f"GET {target} HTTP/1.1\r\nHost: gw.example\r\n")
        assert got == status, body
        assert json.loads(body)["error"] == code
        if status == 402:
            assert json.loads(body)["resource"]["url"] == "http://gw.example/lookup/1"
    untouched(gateway, received)


def test_unknown_methods_and_head_get_no_content_and_no_5xx(gateway: RunningGateway, received: list[Received]) -> None:
    for method in ("PROPFIND", "TRACE", "CONNECT", "DELETE", "FOO"):
        status, _, body = raw(gateway, f"{method} /lookup/1 HTTP/1.1\r\nHost: gw.example\r\n")
        assert status in (400, 405), (method, body)
    status, headers, body = raw(gateway, "HEAD /lookup/1 HTTP/1.1\r\nHost: gw.example\r\nPAYMENT-SIGNATURE: e30=\r\n")
    assert status == 402 and body == b"" and "payment-required" in headers  # a payment on HEAD is ignored
    untouched(gateway, received)


@pytest.mark.parametrize(("headers", "code"), [
    ({"PAYMENT-SIGNATURE": "%%% not base64"}, "payment_header_not_base64"),
    ({"PAYMENT-SIGNATURE": "WzEsMl0="}, "payment_header_not_object"),  # [1,2]
    ({"PAYMENT-SIGNATURE": "//4="}, "payment_header_not_json"),  # not UTF-8
    ({"X-PAYMENT": "e30="}, "invalid_payload"),
    ({"PAYMENT-SIGNATURE": "eyJ4NDAyVmVyc2lvbiI6MiwiYWNjZXB0ZWQiOm51bGx9"}, "invalid_payload"),
    ({"PAYMENT-SIGNATURE": "A" * 40_000}, "request_headers_too_large"),
])
def test_garbage_payment_headers_get_a_stable_code(
        gateway: RunningGateway, received: list[Received], headers: dict[str, str], code: str) -> None:
    with gateway.client() as client:
        answer = client.get("/lookup/1", headers=headers)
    data = refused(answer.status_code, answer.content, code)
    assert data["next"]["action"] in ("fix_payment", "fix_arguments")
    untouched(gateway, received)


def test_two_payment_headers_are_one_refusal_not_two_readings(
        gateway: RunningGateway, received: list[Received], devchain: Devchain) -> None:
    """Whichever of two same-named headers a proxy, a log or the gateway would read, none is read: a
    valid payment beside another (garbage, a second valid one, in any letter case) spends nothing."""
    with gateway.client() as client:
        offer = offer_of(client.get("/lookup/1"))
    valid = encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))
    other = encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))
    payee_before = devchain.balance(PAY_TO)
    for first, second in ((valid, "PAYMENT-SIGNATURE: %%%"), ("%%%", f"PAYMENT-SIGNATURE: {valid}"),
                          (valid, f"PAYMENT-SIGNATURE: {other}"), (valid, f"payment-signature: {valid}")):
        status, _, body = raw(gateway, f"GET /lookup/1 HTTP/1.1\r\nHost: gw.example\r\nPAYMENT-SIGNATURE: {first}\r\n{second}\r\n")
        refused(status, body, "payment_header_repeated")
    for header in (f"X-PAYMENT: {valid}\r\nX-PAYMENT: %%%", f"X-PAYMENT: %%%\r\nx-payment: {valid}"):
        status, _, body = raw(gateway, f"GET /lookup/1 HTTP/1.1\r\nHost: gw.example\r\n{header}\r\n")
        refused(status, body, "payment_header_repeated")
    untouched(gateway, received)
    assert devchain.balance(PAY_TO) == payee_before
    with gateway.client() as client:  # the payment itself is still good, sent alone
        paid = client.get("/lookup/1", headers={"PAYMENT-SIGNATURE": valid})
    assert paid.status_code == 200 and devchain.balance(PAY_TO) == payee_before + int(offer.accepts[0].amount)


def test_a_clients_request_id_is_never_echoed_into_answers(gateway: RunningGateway, received: list[Received]) -> None:
    status, headers, body = raw(gateway, "GET /lookup/1 HTTP/1.1\r\nHost: gw.example\r\n"
                                         f"X-Request-Id: forged\tid {'z' * 8000}\r\n")
    assert status == 402 and REQUEST_ID.fullmatch(headers["x-request-id"])
    assert b"forged" not in body and b"zzzz" not in body
    untouched(gateway, received)


def test_cors_never_grants_credentials_and_exposes_only_the_protocol(gateway: RunningGateway, received: list[Received]) -> None:
    with gateway.client() as client:
        for _ in range(2):
            answer = client.get("/lookup/1", headers={"Origin": "https://evil.example", "Cookie": "s=1"})
            assert answer.status_code == 402
            assert answer.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in answer.headers
            exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
            assert "payment-required" in exposed and "x-request-id" in exposed
            assert not exposed & {"set-cookie", "authorization", "cookie"}
        preflight = client.options("/lookup/1", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "payment-signature"})
        assert preflight.status_code == 200 and "access-control-allow-credentials" not in preflight.headers
        assert "payment-signature" in preflight.headers["access-control-allow-headers"].lower()
    untouched(gateway, received)


def test_repeated_query_keys_cannot_be_reordered_or_doubled_after_signing(
        gateway: RunningGateway, received: list[Received], devchain: Devchain) -> None:
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    with gateway.client() as client:
        assert client.get("/search?q=a&q=b").json()["error"] == "invalid_arguments"  # a scalar given twice
        offer = offer_of(client.get("/search?tag=a&tag=b"))
        header = encode_header(Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource))
        # The array [a, b] was priced and bound; [b, a] is another request.
        moved = client.get("/search?tag=b&tag=a", headers={"PAYMENT-SIGNATURE": header})
        assert moved.status_code == 402 and moved.json()["error"] == "payment_requirements_mismatch", moved.text
        assert received == [] and devchain.balance(payer) == before
        # The request it was signed for is served, with exactly that array upstream.
        paid = client.get("/search?tag=a&tag=b", headers={"PAYMENT-SIGNATURE": header})
        assert paid.status_code == 200, paid.text
    assert [(r.path, r.query) for r in received] == [("/rec/search", "tag=a&tag=b")]
    assert devchain.balance(payer) == before - 1000
