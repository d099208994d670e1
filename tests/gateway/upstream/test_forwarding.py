"""Forward only what was validated (issue 13, finding 6): the challenge stage refuses what the
validator cannot vouch for (duplicate JSON keys, bodies on GET/HEAD/DELETE, control characters
bound for an upstream header), and the bridge sends the upstream the validated arguments, never the
client's bytes; a malicious upstream cannot leak through a redirect or forge our headers.

The upstream is real (loopback) and records exactly the bytes and headers it received."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest

from catalog import Tool, parse_catalog
from gateway.errors import GatewayError
from gateway.ops.serving import ThreadServer
from gateway.pipeline.stages.arguments import collect_arguments
from gateway.pipeline.stages.respond import respond
from gateway.upstream.bridge import AiohttpUpstreamClient, Bridge, UpstreamResponse
from tests.support.forwarding_upstream import SECRET_CONTENT, Received

ORDER_SCHEMA = ("{type: object, properties: {id: {type: string}, symbol: {type: string}, quantity: {type: integer},"
                " price: {type: number}, note: {type: string}, legs: {type: array}}}")


@pytest.fixture
def upstream(recorder: tuple[ThreadServer, list[Received]]) -> tuple[str, list[Received]]:
    server, received = recorder
    received.clear()
    return server.url, received


def tools(base_url: str, entries: str) -> dict[str, Tool]:
    text = f"""
catalog: 1
owner: test
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", asset_name: "USD Coin",
           asset_version: "2", decimals: 6, pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"}}
upstreams:
  up: {{base_url: "{base_url}", timeout_seconds: 5}}
tools:
{entries}
"""
    return {t.name: t for t in parse_catalog(text, "t.yaml").tools}


def entry(name: str, method: str, path: str, upstream_path: str, extra: str = "") -> str:
    return (f"  - name: {name}\n    description: d\n    method: {method}\n    path: {path}\n    price: \"0.001\"\n"
            f"    settle: after\n    upstream_path: {upstream_path}\n    input_schema: {ORDER_SCHEMA}\n{extra}")


def forward(tool: Tool, method: str, params: dict[str, str], query: str, arguments: dict[str, Any],
            headers: dict[str, str], body: bytes) -> UpstreamResponse:
    async def go() -> UpstreamResponse:
        client = AiohttpUpstreamClient()
        try:
            return await Bridge([tool], environ={}).forward(
                client, tool, method, params, query, arguments, headers, body, "rid", 1 << 20
            )
        finally:
            await client.close()

    return asyncio.run(go())


def refusal(call: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call()
    return info.value


# -- the challenge stage: what cannot be validated is refused before any offer ---------------------


@pytest.mark.parametrize("body", [
    b'{"quantity":999999,"symbol":"ACME","quantity":1}',
    b'{"symbol":"ACME","legs":[{"quantity":1,"quantity":999999}]}',
    b'{"symbol":"ACME","price":{"a":1,"b":{"x":1,"x":2}}}',
])
def test_a_duplicate_json_key_anywhere_in_the_body_is_400_naming_the_key(body: bytes) -> None:
    tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/rec/o"))["t"]
    error = refusal(lambda: collect_arguments(tool, {}, [], body, "POST"))
    assert (error.code, error.status) == ("duplicate_json_key", 400)
    assert error.fields["key"] in ("quantity", "x") and error.fields["key"] in error.message


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
@pytest.mark.parametrize("body", [b'{"quantity":1}', b" ", b"x"])
def test_a_body_on_get_head_or_delete_is_400_body_not_allowed(method: str, body: bytes) -> None:
    tool = tools("http://127.0.0.1:1", entry("t", "GET" if method == "HEAD" else method, "/o", "/rec/o"))["t"]
    error = refusal(lambda: collect_arguments(tool, {}, [("symbol", "ACME")], body, method))
    assert (error.code, error.status) == ("body_not_allowed", 400)
    assert collect_arguments(tool, {}, [("symbol", "ACME")], b"", method) == {"symbol": "ACME"}


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json_numbers(constant: bytes) -> None:
    tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/rec/o"))["t"]
    error = refusal(lambda: collect_arguments(tool, {}, [], b'{"price":' + constant + b"}", "POST"))
    assert (error.code, error.status) == ("invalid_json_body", 400)


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb"])
def test_control_characters_in_a_header_mapped_argument_are_invalid_arguments_naming_the_field(value: str) -> None:
    tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/rec/o", "    request: {headers: {X-Note: note}}\n"))["t"]
    body = json.dumps({"symbol": "ACME", "note": value}).encode()
    error = refusal(lambda: collect_arguments(tool, {}, [], body, "POST"))
    assert (error.code, error.status) == ("invalid_arguments", 422)
    assert [f["field"] for f in error.fields["fields"]] == ["note"]
    from_query = refusal(lambda: collect_arguments(tool, {}, [("note", value)], b"", "POST"))
    assert from_query.code == "invalid_arguments"
    # the same text is fine where it is not bound for a header, and a tab is fine in one
    assert collect_arguments(tool, {}, [], json.dumps({"symbol": value, "note": "a\tb"}).encode(), "POST")["symbol"] == value


@pytest.mark.parametrize("body", [
    b'{"symbol":"ACME","note":"a\\ud800"}',
    b'{"symbol":"ACME","legs":[["x\\uDFFF"]]}',
    b'{"symbol":"ACME","\\udc00":1}',
    '{"symbol":"ACME","note":"a\ud800"}'.encode("utf-8", "surrogatepass"),
])
def test_an_unpaired_surrogate_anywhere_in_the_body_is_invalid_json_body(body: bytes) -> None:
    tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/rec/o"))["t"]
    error = refusal(lambda: collect_arguments(tool, {}, [], body, "POST"))
    assert (error.code, error.status) == ("invalid_json_body", 400)
    paired = collect_arguments(tool, {}, [], b'{"note":"\\ud83d\\ude00 \xc3\xa9"}', "POST")
    assert paired == {"note": "\U0001f600 \u00e9"}


@pytest.mark.parametrize("value", ["a\x00b", "a\x1bb", "\ufffe"])
def test_a_soap_tools_argument_xml_cannot_carry_is_invalid_arguments_before_any_offer(value: str) -> None:
    soap = "    kind: soap\n    soap: {endpoint: /soap, namespace: 'urn:test', operation: Echo, result: Result}\n"
    tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/unused", soap))["t"]
    body = json.dumps({"symbol": "ACME", "legs": [{"note": value}]}).encode()
    error = refusal(lambda: collect_arguments(tool, {}, [], body, "POST"))
    assert (error.code, error.status) == ("invalid_arguments", 422)
    assert [f["field"] for f in error.fields["fields"]] == ["legs"]
    assert collect_arguments(tool, {}, [], json.dumps({"note": "tab\tcr\rlf\n"}).encode(), "POST")


# -- the bridge: the upstream gets the validated arguments, re-serialised ---------------------------


def test_the_upstream_gets_the_validated_arguments_as_json_never_the_clients_bytes(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", "POST", "/o/{id}", "/rec/o/{id}"))["t"]
    raw = b'{ "symbol" : "ACME",\n "quantity": 1, "price": 0.1000000000000000000001, "legs": [1.50, -0.0, 1E+2, 7] }'
    arguments = collect_arguments(tool, {"id": "7"}, [("note", "n")], raw, "POST")
    answer = forward(tool, "POST", {"id": "7"}, "note=n", arguments,
                     {"content-type": "text/plain", "accept": "application/json", "cookie": "c=1"}, raw)
    assert answer.status == 200
    [got] = received
    assert (got.method, got.path, got.query) == ("POST", "/rec/o/7", "note=n")
    # path and query arguments stay where they came from; the body holds the body's, exactly
    assert got.body == b'{"symbol":"ACME","quantity":1,"price":0.1000000000000000000001,"legs":[1.50,-0.0,1E+2,7]}'
    assert json.loads(got.body, parse_float=Decimal)["price"] == Decimal("0.1000000000000000000001")
    assert got.header("content-type") == "application/json"
    assert got.header("cookie") is None and got.header("accept") == "application/json"


def test_a_first_key_wins_upstream_reads_what_was_validated(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", "PUT", "/o", "/rec/o"))["t"]
    # what the pipeline would have validated had duplicates been let through: the last value
    arguments = {"symbol": "ACME", "quantity": 1}
    answer = forward(tool, "PUT", {}, "", arguments, {"content-type": "text/plain"},
                     b'{"quantity":999999,"symbol":"ACME","quantity":1}')
    assert json.loads(answer.body)["firstKeyWins"] == {"symbol": "ACME", "quantity": 1}
    assert received[0].body == b'{"symbol":"ACME","quantity":1}'


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_call_without_a_body_sends_none_whatever_it_is_handed(method: str, upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", method, "/o", "/rec/o"))["t"]
    forward(tool, method, {}, "symbol=ACME", {"symbol": "ACME"}, {"content-type": "text/plain"}, b'{"quantity":999999}')
    [got] = received
    assert got.body == b"" and got.header("content-type") is None and got.query == "symbol=ACME"


def test_a_post_without_body_arguments_sends_an_empty_json_object(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", "POST", "/o", "/rec/o"))["t"]
    forward(tool, "POST", {}, "symbol=ACME", {"symbol": "ACME"}, {"content-type": "application/xml"}, b"<x/>")
    assert received[0].body == b"{}" and received[0].header("content-type") == "application/json"


def test_a_control_character_in_a_header_argument_is_a_422_at_the_bridge_too(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", "GET", "/o", "/rec/o", "    request: {headers: {X-Note: note}}\n"))["t"]
    error = refusal(lambda: forward(tool, "GET", {}, "", {"note": "a\r\nX-Injected: 1"}, {}, b""))
    assert (error.code, error.status) == ("invalid_arguments", 422) and received == []


def test_the_soap_envelope_is_built_from_the_arguments_alone(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    soap = ("    kind: soap\n    soap: {endpoint: /soap, namespace: 'urn:test', operation: Echo,"
            " arguments: {Symbol: symbol, Quantity: quantity}, result: Result}\n")
    tool = tools(base, entry("t", "POST", "/o", "/unused", soap))["t"]
    raw = b'{"quantity":999999,"symbol":"ACME","quantity":1,"note":"<Injected/>"}'
    answer = forward(tool, "POST", {}, "", {"symbol": "ACME", "quantity": 1}, {"content-type": "text/plain"}, raw)
    assert answer.status == 200 and json.loads(answer.body) == {"value": "ok"}
    [got] = received
    assert got.header("content-type") == "text/xml; charset=utf-8"
    assert b"<m:Echo><m:Symbol>ACME</m:Symbol><m:Quantity>1</m:Quantity></m:Echo>" in got.body
    assert b"999999" not in got.body and b"Injected" not in got.body


def test_a_soap_argument_xml_cannot_carry_is_a_422_at_the_bridge_too(upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    soap = "    kind: soap\n    soap: {endpoint: /soap, namespace: 'urn:test', operation: Echo, arguments: [note], result: Result}\n"
    tool = tools(base, entry("t", "POST", "/o", "/unused", soap))["t"]
    for value in ("a\x00b", "a\ud800b"):
        error = refusal(lambda: forward(tool, "POST", {}, "", {"note": value}, {}, b""))
        assert (error.code, error.status) == ("invalid_arguments", 422)
    assert received == []


# -- a malicious upstream ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_upstream_redirect_is_a_502_upstream_redirect_with_nothing_of_it(method: str, upstream: tuple[str, list[Received]]) -> None:
    base, received = upstream
    tool = tools(base, entry("t", method, "/o", "/redirect"))["t"]
    error = refusal(lambda: forward(tool, method, {}, "", {}, {}, b""))
    assert (error.code, error.status) == ("upstream_redirect", 502)
    assert error.fields["upstreamStatus"] == 302 and "location" not in {k.lower() for k in error.headers}
    assert b"paid content" not in error.to_response().body and b"elsewhere" not in error.to_response().body
    assert len(received) == 1  # never followed


def test_soap_upstream_redirect_is_a_502_upstream_redirect(upstream: tuple[str, list[Received]]) -> None:
    base, _ = upstream
    soap = "    kind: soap\n    soap: {endpoint: /redirect, namespace: 'urn:test', operation: Echo, result: Result}\n"
    tool = tools(base, entry("t", "GET", "/o", "/unused", soap))["t"]
    assert refusal(lambda: forward(tool, "GET", {}, "", {}, {}, b"")).code == "upstream_redirect"


@pytest.mark.parametrize("path", ["/spoof", "/spoof-error"])
def test_an_upstream_cannot_forge_receipts_offers_cookies_or_gateway_headers(path: str, upstream: tuple[str, list[Received]]) -> None:
    base, _ = upstream
    tool = tools(base, entry("t", "GET", "/o", path))["t"]
    answer = forward(tool, "GET", {}, "", {}, {}, b"")
    forged = {"payment-response", "x-payment-response", "payment-required", "x402gw-replay", "x402gw-refund", "set-cookie"}
    assert forged.isdisjoint(k.lower() for k, _ in answer.headers)
    sent = respond(answer, None, "rid")  # what the agent would get, no receipt (an unpaid error)
    assert forged.isdisjoint(sent.headers.keys())
    if path == "/spoof":
        assert answer.header("x-upstream-note") == "kept"  # an upstream's own headers still pass
    assert SECRET_CONTENT not in answer.body


def test_a_cookie_one_call_got_never_reaches_the_upstream_on_another(upstream: tuple[str, list[Received]]) -> None:
    """One upstream client serves every payer's calls: a cookie an upstream set on one call (say, for
    payer A's session) must not be sent back on the next (payer B's). The upstream is named by host
    name here: an HTTP client's cookie jar keeps no cookie from a bare IP address, so 127.0.0.1 would
    hide the leak."""
    base, received = upstream
    by_name = base.replace("127.0.0.1", "localhost")
    spoof, rec = (tools(by_name, entry("t", "GET", "/o", path))["t"] for path in ("/spoof", "/rec/next"))

    async def two_calls() -> None:
        client = AiohttpUpstreamClient()  # shared, as the gateway's one client is
        try:
            for tool in (spoof, rec):
                await Bridge([tool], environ={}).forward(client, tool, "GET", {}, "", {}, {}, b"", "rid", 1 << 20)
        finally:
            await client.close()

    asyncio.run(two_calls())
    assert [r.path for r in received] == ["/spoof", "/rec/next"]
    assert received[1].header("cookie") is None, received[1].header("cookie")
