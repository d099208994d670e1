"""Attacks: exhausting the gateway's process with inputs that cost the attacker (almost) nothing.

Each test states an attack, the behaviour the gateway should have, and asserts on a bounded
structure, on content, or on the gateway still answering (a generous timeout guards a hang;
nothing here asserts on how long something took).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from gateway.settings import DEFAULT_CATALOG, Settings
from gateway.store import MemoryStore
from settlement.audit import AuditTrail, AuditWriter
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, offer_of
from tests.e2e.test_siwx_reaccess import free_port, reaccess_settings, sign_in_challenge, signed
from tests.gateway.pipeline.test_fastpath import NoFacilitator

PAYER = 8  # anvil account paying in this module


def _suite_catalog(tmp_path: Path, devchain: Devchain, upstream: str, tools: str) -> Path:
    text = f"""
catalog: 1
owner: exhaustion-review
payment:
  network: "eip155:31337"
  asset: "{devchain.token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{PAY_TO}"
  max_timeout_seconds: 120
upstreams:
  up: {{base_url: "{upstream}", timeout_seconds: 20}}
tools:
{tools}
"""
    path = tmp_path / "exhaustion.yaml"
    path.write_text(text)
    return path


def _paid_get(client: httpx.Client, devchain: Devchain, path: str) -> httpx.Response:
    offer = offer_of(client.get(path))
    payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource)
    return client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(payment)})


# -- free requests: the audit trail and the fast path's cache -------------------------------------


@pytest.fixture
def audited_app(tmp_path: Path) -> Iterator[tuple[str, Any, AuditWriter]]:
    """The demo catalog on loopback, no chain needed (nothing here is paid), with its persistent audit trail."""
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    settings = Settings(catalog=[DEFAULT_CATALOG], database_url=database_url)
    ledger = open_ledger(database_url)
    writer = AuditWriter(AuditTrail(database_url))
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger, audit=writer,
                     facilitator=NoFacilitator(), store=MemoryStore())
    try:
        with ThreadServer(app) as server:
            yield server.url, app, writer
    finally:
        ledger.close()


def test_a_free_request_cannot_write_an_unbounded_record_into_the_audit_trail(
    audited_app: tuple[str, Any, AuditWriter],
) -> None:
    """Attack (griefer, "fill the audit trail"): GET a path of ~60 KB that matches no tool. It costs
    nothing, is not rate limited (no tool, so no per-client rule), and the pipeline's audit stage
    writes the whole path into the hash-chained ``response`` record, kept forever: 60 KB of
    database per free request, repeated at line rate. The 402 path is bounded by the offer's
    MAX_RESOURCE_URL, the 404/422 paths are not.

    Correct: what a request writes to the trail is bounded whatever its path (the path cut to a
    few hundred characters, plus its length or a digest), so a flood of junk costs the gateway a
    bounded amount per request."""
    url, _, writer = audited_app
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get("/" + "a" * 60_000)
    assert response.status_code == 404
    assert writer.drain(30), "the audit writer did not catch up"
    records = writer.trail.for_request(response.headers["x-request-id"])
    sizes = {record.event: len(record.data) for record in records}
    assert records and max(sizes.values()) <= 4096, f"audit records of one free 404, bytes: {sizes}"


def test_the_fast_path_cache_does_not_pin_huge_keys_of_refused_requests(
    audited_app: tuple[str, Any, AuditWriter],
) -> None:
    """Attack (griefer, memory): the unpaid fast path keeps one entry per distinct (method, path,
    query, Host...) up to MAX_ENTRIES = 1024, "a few KB each"; but a request the pipeline refuses
    (404, 422) is kept too, as ``None`` under its full key. 1024 free requests with distinct 60 KB
    paths pin ~60 MB of keys (and a Host header or query string can add as much again), all the
    time, refreshed by the attacker at will.

    Correct: a key longer than what an offer may name is never cached (as ``check_arguments``
    does with ``_MAX_KEY_CHARS``), so the cache stays within MAX_ENTRIES x a few KB."""
    url, app, _ = audited_app
    with httpx.Client(base_url=url, timeout=30) as client:
        for index in range(1100):
            response = client.get(f"/quotes/{index:05d}" + "A" * 60_000)  # the symbol's pattern: 422
            assert response.status_code in (404, 422), response.status_code
    fast_path = app.middleware_stack
    entries = fast_path._entries
    pinned = sum(len(key[1]) + len(key[2]) + len(key[3]) for key in entries)
    assert pinned <= 8 * 1024 * 1024, f"{len(entries)} cached entries pin {pinned / 2**20:.1f} MiB of request keys"


# -- a slow upstream: the answer read in full, or nothing charged ----------------------------------


FULL_BODY = b'{"items": [' + b",".join(b'{"id": %d, "name": "item-%d"}' % (i, i) for i in range(5000)) + b"]}"
SPLIT = 1000


class TwoPartUpstream:
    """A raw HTTP/1.1 upstream that sends its headers and the first SPLIT bytes of FULL_BODY, then
    the rest only once it sees the client is still waiting (no close within the guard)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.closed_early = 0
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(FULL_BODY) + FULL_BODY[:SPLIT])
            conn.settimeout(5)  # guard: a client still reading gets the rest after it
            try:
                if conn.recv(1) == b"":
                    self.closed_early += 1  # the client gave up on the rest of the body
                    return
            except TimeoutError:
                pass
            conn.sendall(FULL_BODY[SPLIT:])

    def close(self) -> None:
        self.sock.close()


def test_an_upstream_answer_that_arrives_in_two_parts_is_never_sold_cut_short(
    tmp_path: Path, devchain: Devchain, start_gateway: GatewayFactory,
) -> None:
    """Attack (malicious or merely slow upstream, and the payer as victim): the upstream sends its
    headers (Content-Length: the whole body) and the first 1000 bytes, then the rest a moment later.
    ``AiohttpUpstreamClient.send`` reads with ``response.content.read(max_bytes + 1)``, which
    returns as soon as *any* bytes are buffered: the gateway takes the first 1000 bytes as the whole
    answer, serves that cut JSON as a 200 and settles the payment (THREATS: never a charge without
    the answer it paid for). The same cut also defeats the size limit for a chunked answer.

    Correct: the body is read until its end (or past max_bytes: 502 upstream_response_too_large),
    e.g. with ``read()`` in a loop / ``readexactly`` / ``iter_chunked`` counting bytes; a body shorter
    than its Content-Length is a failed upstream call and charges nothing."""
    upstream = TwoPartUpstream()
    try:
        catalog = _suite_catalog(tmp_path, devchain, upstream.url, """
  - name: list_items
    description: Every item
    method: GET
    path: /items
    price: "0.002"
""")
        gateway = start_gateway(catalog)
        payer = devchain.address(PAYER)
        before = devchain.balance(payer)
        with gateway.client() as client:
            paid = _paid_get(client, devchain, "/items")
        charged = before - devchain.balance(payer)
        assert charged == 0 or paid.content == FULL_BODY, (
            f"charged {charged} atomic units for HTTP {paid.status_code} with {len(paid.content)} of the "
            f"upstream's {len(FULL_BODY)} bytes (the upstream saw the gateway close early {upstream.closed_early}x)"
        )
    finally:
        upstream.close()


# -- a large SOAP answer converted on the event loop ----------------------------------------------


SOAP_ITEMS = 400  # small enough to arrive in one read (see the two-part test above)
SOAP_ANSWER = (
    b'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
    b'<soap:Body><SearchResponse xmlns="urn:review"><Items>'
    + b"".join(b'<Item sku="S%d"><Name>n</Name><Price>1.5</Price></Item>' % i for i in range(SOAP_ITEMS))
    + b"</Items></SearchResponse></soap:Body></soap:Envelope>"
)


class SoapUpstream:
    """Answers every POST with SOAP_ANSWER."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def soap(request: Request) -> Response:
            await request.body()
            return Response(SOAP_ANSWER, media_type="text/xml; charset=utf-8")

        self.app = Starlette(routes=[Route("/soap", soap, methods=["POST"])])


def test_a_soap_answer_is_not_converted_on_the_event_loop(
    tmp_path: Path, devchain: Devchain, start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack (malicious upstream, or a caller whose query makes a SOAP service answer big): the
    bridge parses the XML and turns it into JSON (``soap.element_to_json``) synchronously on the
    event loop. Measured here: a 10 MB answer (the default X402GW_MAX_UPSTREAM_RESPONSE_BYTES allows
    it) of 1M small elements takes ~4.5 s to convert, ~13 s with a 60-property output_schema
    (``_property`` rebuilds the folded-name dict for every element): the whole gateway, every
    tenant's 402s, paid calls, /healthz, stops for that long, per such answer.

    The test converts a small answer (a small one shows it as well as a big one)
    and, from inside the conversion, asks the same gateway for /healthz (a 10 s guard): a gateway
    converting on its event loop cannot answer, whatever the size.

    Correct: parse and convert big answers off the loop (``asyncio.to_thread`` around parse_xml /
    element_to_json / check_rules in ``Bridge._soap``), and precompute the schema's folded names
    once per schema instead of per element."""
    import gateway.upstream.bridge as bridge_module
    import gateway.upstream.soap as soap_module

    with ThreadServer(SoapUpstream().app) as soap_server:
        catalog = _suite_catalog(tmp_path, devchain, soap_server.url, """
  - name: search_items
    description: Search the items
    method: GET
    path: /search
    price: "0.002"
    kind: soap
    soap:
      endpoint: /soap
      version: "1.1"
      action: "urn:review/Search"
      namespace: "urn:review"
      operation: Search
      result: Items
""")
        gateway = start_gateway(catalog, max_upstream_response_bytes=10 * 1024 * 1024)
        original = bridge_module.element_to_json
        seen: list[str] = []

        def converting(element: Any, schema: Any) -> Any:
            if not seen:
                try:
                    seen.append(str(httpx.get(f"{gateway.url}/healthz", timeout=10).status_code))
                except httpx.TimeoutException:
                    seen.append("no answer while an upstream answer was converted")
            return original(element, schema)

        monkeypatch.setattr(bridge_module, "element_to_json", converting)
        monkeypatch.setattr(soap_module, "element_to_json", converting)
        with gateway.client() as client:
            paid = _paid_get(client, devchain, "/search")
        assert paid.status_code == 200, paid.text[:300]
        assert len(paid.json()["Item"]) == SOAP_ITEMS
        assert seen == ["200"], f"/healthz during the conversion: {seen}"


# -- caller-chosen expressions ---------------------------------------------------------------------


TRIM_TOOL = """
  - name: list_items
    description: Every item
    method: GET
    path: /items
    price: "0.002"
    input_schema: {type: object, properties: {category: {type: string}}, additionalProperties: false}
    answers: {trim: true}
"""


def test_a_deeply_nested_projection_is_a_400_not_a_crash(
    tmp_path: Path, devchain: Devchain, start_gateway: GatewayFactory, upstream: str,
) -> None:
    """Attack (free-rider, CPU/stack): ``x402gw_fields`` takes up to 512 characters and is compiled
    before any 402; ``compile_projection`` bounds the length and the node count *after* parsing,
    but jmespath's parser recurses once per prefix operator, so 400-511 ``!`` blow Python's
    recursion limit inside ``Parser().parse``: a RecursionError that ``compile_projection`` does not
    catch, so an unpaid request gets a 500 (and a traceback in the log) instead of the documented
    400 ``answer_fields_invalid``.

    Correct: reject by a cheap pre-check on the tokens (nesting depth / operator runs) before
    parsing, and turn a RecursionError into ``answer_fields_invalid``."""
    catalog = _suite_catalog(tmp_path, devchain, upstream, TRIM_TOOL)
    gateway = start_gateway(catalog)
    with gateway.client() as client:
        response = client.get("/items", params={"x402gw_fields": "!" * 511 + "a"})
        assert response.status_code == 400, (response.status_code, response.text[:300])
        assert response.json()["error"] == "answer_fields_invalid"
        assert client.get("/healthz").status_code == 200


# -- sign-in-with-x nonces of addresses that never paid ----------------------------------------------


def test_sign_ins_of_addresses_that_never_paid_leave_nothing_in_the_store(
    tmp_path: Path, devchain: Devchain, upstream: str,
) -> None:
    """Attack (griefer, memory of the shared store): a fresh key costs nothing, and its signature
    over the 402's sign-in challenge is valid. ``Reaccess`` takes the sign-in's nonce in the state
    store (``siwx:nonce:<nonce>``, kept NONCE_TTL_MS = 6 min) *before* it looks in the ledger for a
    payment of that address; so every sign-in of a key that never paid writes a key that stays 6
    minutes: with no per-client limit configured (the default), memory (or Redis) grows with the
    attacker's request rate, in keys of the attacker's choosing.

    Correct: look up the payment first and spend the nonce only for an address that has one (a
    refused sign-in writes nothing: THREATS, "filled after authentication"; here the authorization
    is the payment)."""
    port = free_port()
    settings = reaccess_settings(tmp_path, devchain, upstream, public_url=f"http://127.0.0.1:{port}")
    ledger = open_ledger(settings.database_url)
    store = MemoryStore()
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger, store=store)
    try:
        with ThreadServer(app, port=port) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            params = {"city": "Oslo", "units": "metric"}
            for _ in range(20):
                stranger = Account.create()
                header = signed(sign_in_challenge(http.get("/weather", params=params)), stranger)
                refused = http.get("/weather", params=params, headers={"SIGN-IN-WITH-X": header})
                assert refused.status_code == 402 and refused.json()["error"] == "reaccess_not_paid", refused.text
            kept = [key for key in store._values if key.startswith("siwx:")]
    finally:
        ledger.close()
    assert kept == [], f"{len(kept)} sign-in nonces kept for addresses that never paid"


# -- a body that never finishes --------------------------------------------------------------------


def test_a_body_that_stalls_midway_is_refused_not_waited_for_forever(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slowloris: a client sends a paid tool's request with ``Content-Length: 100`` and ten bytes of
    it, then nothing. The gateway waited for the rest for as long as the connection stayed open: one
    task and its buffered body per such client, for ever. It gives up after ``BODY_SECONDS`` (shortened
    here) with 408 ``request_body_timeout``, and goes on serving."""
    import gateway.pipeline.stages.arguments as arguments

    monkeypatch.setattr(arguments, "BODY_SECONDS", 0.5)
    gateway = start_gateway()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as stalled:  # the timeout guards a hang
        stalled.sendall(b"POST /orders HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n" + b'{"symbol"')
        answer = b""
        while b"\r\n\r\n" not in answer or b"request_body_timeout" not in answer:
            chunk = stalled.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_body_timeout" in answer
    with gateway.client() as client:
        assert client.get("/quotes/ACME").status_code == 402
