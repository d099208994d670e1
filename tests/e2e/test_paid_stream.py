"""Paid streaming answers through the gateway on anvil (``stream: true``): relayed as they arrive,
settled when they end, per the tool's rule. upto streams are paid by the official SDK's upto client
and charged what the stream used (a usage field in its events, or its events); a payer that leaves
mid-stream is charged what it received (or nothing, per rule); an upstream that breaks off
mid-stream is charged what was delivered; an exact stream settles before it starts. Each with the
invariant: ledger == chain, one upstream call per payment."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog import load_catalogs
from gateway.app import create_app
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_exactly_once import wait_for
from tests.e2e.test_upto_paid_call import _header
from tests.support.usage_upstream import UsageUpstream

EACH = 100  # 0.0001 per unit
CATALOG = """
catalog: 1
owner: acme-streams
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  streams:
    base_url: "{streams}"
  legacy:
    base_url: "{legacy}"
  slow:
    base_url: "{streams}"
    timeout_seconds: 1
    retry: {{attempts: 1}}
tools:
  - name: ticks_slow
    description: Events from an upstream slower than its one-second budget.
    method: GET
    path: /slow/{{n}}
    upstream: slow
    upstream_path: /stream/{{n}}
    price: 0.0001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: events}}
    input_schema:
      type: object
      properties: {{n: {{type: string}}, pace_ms: {{type: integer}}}}
      required: [n]
  - name: ticks
    description: n events, charged by the usage each event reports.
    method: GET
    path: /ticks/{{n}}
    upstream: streams
    upstream_path: /stream/{{n}}
    price: 0.0001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: event_field, pointer: /usage/units}}
    input_schema:
      type: object
      properties: {{n: {{type: string}}, fail_after: {{type: integer}}, hold_after: {{type: integer}}}}
      required: [n]
  - name: ticks_all_or_nothing
    description: The same, charged nothing unless the stream completes.
    method: GET
    path: /whole/{{n}}
    upstream: streams
    upstream_path: /stream/{{n}}
    price: 0.0001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: events, partial: nothing}}
    input_schema:
      type: object
      properties: {{n: {{type: string}}, fail_after: {{type: integer}}, hold_after: {{type: integer}}}}
      required: [n]
  - name: ticks_exact
    description: n events for a fixed price, settled before they start.
    method: GET
    path: /exact/{{n}}
    upstream: streams
    upstream_path: /stream/{{n}}
    price: 0.002
    stream: true
    input_schema: {{type: object, properties: {{n: {{type: string}}}}, required: [n]}}
  - name: complete_stream
    description: A streamed completion, charged per completion token reported.
    method: POST
    path: /complete
    upstream: legacy
    upstream_path: /v1/completions
    price: 0.0001
    max_price: 0.01
    settle: after
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: event_field, pointer: /usage/completion_tokens}}
    input_schema:
      type: object
      properties:
        prompt: {{type: string}}
        max_tokens: {{type: integer, minimum: 1, maximum: 512}}
        stream: {{const: true}}
      required: [prompt, max_tokens, stream]
"""


@pytest.fixture
def streams() -> Iterator[UsageUpstream]:
    upstream = UsageUpstream()
    with ThreadServer(upstream.app()) as server:
        upstream.url = server.url  # type: ignore[attr-defined]
        yield upstream
    upstream.release()


@pytest.fixture
def stream_gateway(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, streams: UsageUpstream,
                   upstream: str) -> RunningGateway:
    path = tmp_path / "streams.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, streams=streams.url, legacy=upstream))  # type: ignore[attr-defined]
    return start_gateway(path)


def _signed(gateway: RunningGateway, devchain: Devchain, payer: int, method: str, path: str, body: Any = None) -> str:
    with gateway.client() as http:
        offer = http.request(method, path, json=body)
    assert offer.status_code == 402, offer.text
    required = json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"]))
    return _header(devchain, payer, required) if required["accepts"][0]["scheme"] == "upto" else _exact(devchain, payer, required)


def _exact(devchain: Devchain, payer: int, required: dict[str, Any]) -> str:
    from gateway.devkit.payer import Payer
    from settlement.x402.codec import encode_header
    from settlement.x402.wire import PaymentRequirements

    accepted = PaymentRequirements.model_validate(required["accepts"][0])
    return encode_header(Payer(devchain.key(payer)).sign(accepted, resource=required["resource"]).to_wire())


def _events(text: str) -> list[tuple[str, str]]:
    """(event name, data) of each SSE event."""
    found = []
    for raw in text.split("\n\n"):
        if not raw.strip():
            continue
        name = next((line[6:].strip() for line in raw.split("\n") if line.startswith("event:")), "message")
        data = "\n".join(line[5:].strip() for line in raw.split("\n") if line.startswith("data:"))
        found.append((name, data))
    return found


def _settlement(text: str) -> dict[str, Any]:
    [(name, data)] = [e for e in _events(text) if e[0] == "x402-settlement"]
    outcome: dict[str, Any] = json.loads(data)
    return outcome


def _balances(devchain: Devchain, payer: int) -> tuple[int, int]:
    return devchain.balance(devchain.address(payer)), devchain.balance(PAY_TO)


def _moved(devchain: Devchain, payer: int, before: tuple[int, int]) -> tuple[int, int]:
    now = _balances(devchain, payer)
    return before[0] - now[0], now[1] - before[1]


def test_a_streamed_completion_is_relayed_and_settles_its_tokens(
    stream_gateway: RunningGateway, devchain: Devchain,
) -> None:
    body = {"prompt": "stream me a poem", "max_tokens": 9, "stream": True}
    header = _signed(stream_gateway, devchain, 3, "POST", "/complete", body)
    before = _balances(devchain, 3)
    with stream_gateway.client() as http:
        response = http.post("/complete", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    tokens = [json.loads(d)["text"] for n, d in events if n == "message" and d != "[DONE]"]
    assert len(tokens) == 9 and events[-2] == ("message", "[DONE]")
    outcome = _settlement(response.text)
    assert outcome["success"] is True and outcome["amount"] == str(9 * EACH)
    assert outcome["extra"]["charge"]["units"] == "9" and outcome["extra"]["charge"]["capped"] is False
    [row] = stream_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 9 * EACH and row.tx_hash == outcome["transaction"]
    assert _moved(devchain, 3, before) == (9 * EACH, 9 * EACH)
    with stream_gateway.client() as http:  # the same payment again: what was delivered, never a second charge
        again = http.post("/complete", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200 and len([e for e in _events(again.text) if e[0] == "message"]) == 10
    assert _moved(devchain, 3, before) == (9 * EACH, 9 * EACH)


def test_an_upstream_breaking_off_mid_stream_is_charged_what_was_delivered(
    stream_gateway: RunningGateway, devchain: Devchain, streams: UsageUpstream,
) -> None:
    header = _signed(stream_gateway, devchain, 4, "GET", "/ticks/10?fail_after=4")
    before = _balances(devchain, 4)
    with stream_gateway.client() as http:
        response = http.get("/ticks/10?fail_after=4", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200
    assert [json.loads(d)["i"] for n, d in _events(response.text) if n == "message"] == [1, 2, 3, 4]
    outcome = _settlement(response.text)
    assert outcome["success"] is True and outcome["amount"] == str(4 * EACH)
    [row] = stream_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 4 * EACH
    assert _moved(devchain, 4, before) == (4 * EACH, 4 * EACH)
    assert streams.calls["stream-10"] == 1


def test_an_upstream_breaking_off_charges_nothing_under_partial_nothing(
    stream_gateway: RunningGateway, devchain: Devchain,
) -> None:
    header = _signed(stream_gateway, devchain, 5, "GET", "/whole/10?fail_after=4")
    before = _balances(devchain, 5)
    with stream_gateway.client() as http:
        response = http.get("/whole/10?fail_after=4", headers={"PAYMENT-SIGNATURE": header})
    outcome = _settlement(response.text)
    assert outcome["success"] is True and outcome["amount"] == "0" and not outcome.get("transaction")
    [row] = stream_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 0 and row.tx_hash is None
    assert _moved(devchain, 5, before) == (0, 0)


def _leave_after(gateway: RunningGateway, path: str, header: str, events: int) -> None:
    """A payer that reads ``events`` events of a stream, then hangs up."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nPAYMENT-SIGNATURE: {header}\r\n\r\n".encode())
        received = b""
        while received.count(b'"usage"') < events:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk


@pytest.mark.parametrize(("path", "charged_per_event"), [("/ticks/50?hold_after=3", True), ("/whole/50?hold_after=3", False)])
def test_a_payer_leaving_mid_stream_is_charged_per_rule(
    stream_gateway: RunningGateway, devchain: Devchain, streams: UsageUpstream, path: str, charged_per_event: bool,
) -> None:
    header = _signed(stream_gateway, devchain, 6, "GET", path)
    before = _balances(devchain, 6)
    _leave_after(stream_gateway, path, header, 3)
    # The upstream holds after 3 events: only the payer's leaving can end this stream, and the
    # gateway settles as soon as it sees it gone.
    row = wait_for(lambda: next((r for r in stream_gateway.ledger.all() if r.state == PaymentState.SETTLED), None),
                   "the stream's settlement")
    streams.release()
    if charged_per_event:  # the 3 events it received
        assert row.amount == 3 * EACH and row.tx_hash is not None
    else:
        assert row.amount == 0 and row.tx_hash is None
    assert _moved(devchain, 6, before) == (row.amount, row.amount)
    assert streams.calls["stream-50"] == 1


def test_an_exact_stream_settles_before_it_starts(stream_gateway: RunningGateway, devchain: Devchain) -> None:
    header = _signed(stream_gateway, devchain, 7, "GET", "/exact/5")
    before = _balances(devchain, 7)
    with stream_gateway.client() as http, http.stream("GET", "/exact/5", headers={"PAYMENT-SIGNATURE": header}) as response:
        # the receipt comes with the headers, before any content: settled first
        assert response.status_code == 200 and "payment-response" in response.headers
        [row] = stream_gateway.ledger.all()
        assert row.state == PaymentState.SETTLED
        text = response.read().decode()
    assert [json.loads(d)["i"] for n, d in _events(text) if n == "message" and d != "[DONE]"] == [1, 2, 3, 4, 5]
    assert not [e for e in _events(text) if e[0] == "x402-settlement"]  # settled already: nothing to add
    assert _moved(devchain, 7, before) == (2000, 2000)


def test_discovery_says_which_tools_stream(stream_gateway: RunningGateway) -> None:
    with stream_gateway.client() as http:
        tools = {t["function"]["name"]: t for t in http.get("/tools").json()["tools"]}
    assert tools["ticks"]["stream"] is True and tools["ticks_exact"]["settle"] == "upfront"
    assert tools["ticks"]["usage"]["from"] == "event_field"


def test_stream_catalog_refusals_have_clear_codes() -> None:
    from catalog import CatalogError, parse_catalog

    base = CATALOG.format(token="0x" + "11" * 20, pay_to=PAY_TO, streams="http://127.0.0.1:1", legacy="http://127.0.0.1:2")
    cases = {
        "stream_settles_upfront": base.replace("    price: 0.002\n    stream: true\n", "    price: 0.002\n    stream: true\n    settle: after\n"),
        "usage_needs_stream": base.replace("usage: {from: events, partial: nothing}", "usage: {from: json, pointer: /n}"),
        "stream_needs_usage": base.replace("    usage: {from: events, partial: nothing}\n", ""),
    }
    for code, text in cases.items():
        with pytest.raises(CatalogError) as raised:
            parse_catalog(text)
        assert code in {issue.code for issue in raised.value.issues}, (code, raised.value)
    tools = {t.name: t for t in parse_catalog(base).tools}
    assert tools["ticks_exact"].settle == "upfront" and tools["ticks"].settle == "after"


def test_the_same_payment_sent_again_while_its_stream_runs_is_refused_and_charged_once(
    stream_gateway: RunningGateway, devchain: Devchain, streams: UsageUpstream,
) -> None:
    """An attacker resends a payment whose stream is still running: 409 (in flight), the upstream is
    not called again, and the one stream settles once for what it delivered."""
    path = "/ticks/6?hold_after=2"
    header = _signed(stream_gateway, devchain, 8, "GET", path)
    before = _balances(devchain, 8)
    with stream_gateway.client() as http, http.stream("GET", path, headers={"PAYMENT-SIGNATURE": header}) as first:
        lines = first.iter_lines()
        seen = 0
        while seen < 2:  # the first two events are through: the stream is live and the upstream holds
            seen += next(lines).startswith("data:")
        with stream_gateway.client() as other:
            again = other.get(path, headers={"PAYMENT-SIGNATURE": header})
        assert again.status_code == 409 and again.json()["error"] == "payment_in_flight", again.text
        assert streams.calls["stream-6"] == 1
        streams.release()
        rest = "\n".join(lines)
    assert _settlement(rest)["amount"] == str(6 * EACH)
    [row] = stream_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == 6 * EACH
    assert _moved(devchain, 8, before) == (6 * EACH, 6 * EACH)
    assert streams.calls["stream-6"] == 1


def test_a_stream_is_cut_at_its_upstream_time_budget_and_charged_what_it_delivered(
    stream_gateway: RunningGateway, devchain: Devchain, streams: UsageUpstream,
) -> None:
    """The upstream sends an event every 300 ms, each read well inside its 1 s timeout, but the
    whole stream would take 6 s: past the tool's budget (what its lock and payment were sized for)
    the gateway ends it, says why, and charges the events delivered."""
    path = "/slow/20?pace_ms=300"
    header = _signed(stream_gateway, devchain, 2, "GET", path)
    before = _balances(devchain, 2)
    with stream_gateway.client() as http:
        response = http.get(path, headers={"PAYMENT-SIGNATURE": header})
    delivered = [d for n, d in _events(response.text) if n == "message"]
    outcome = _settlement(response.text)
    assert outcome["streamEnded"] == "stream_time_limit" and outcome["success"] is True
    assert 0 < len(delivered) < 20 and outcome["amount"] == str(len(delivered) * EACH)
    [row] = stream_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == len(delivered) * EACH
    assert _moved(devchain, 2, before) == (row.amount, row.amount)


def test_a_server_stopping_waits_for_the_settlement_of_a_stream_whose_payer_left(
    devchain: Devchain, tmp_path: Path, streams: UsageUpstream, upstream: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The payer hangs up after 3 events and the server is stopped while that stream's settlement
    is still running: the shutdown waits for it before closing the ledger and the chain, so what
    was streamed is charged, once."""
    import gateway.app as app_module
    import gateway.pipeline.stages.relay as relay

    started, draining, release = threading.Event(), threading.Event(), threading.Event()
    real_settle, real_drain = relay.settle, relay.drain_stream_settlements

    async def held_settle(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.to_thread(release.wait, 60)  # until the server is stopping
        return await real_settle(*args, **kwargs)

    async def observed_drain(*args: Any, **kwargs: Any) -> int:
        draining.set()
        return await real_drain(*args, **kwargs)

    monkeypatch.setattr(relay, "settle", held_settle)
    monkeypatch.setattr(app_module, "drain_stream_settlements", observed_drain)
    path = tmp_path / "streams.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, streams=streams.url, legacy=upstream))  # type: ignore[attr-defined]
    settings = Settings(catalog=[path], deployment_file=devchain.deployment_file,
                        database_url=f"sqlite:///{tmp_path / 'stopping.sqlite3'}", receipt_timeout_seconds=10)
    ledger = open_ledger(settings.database_url)
    server = ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start()
    try:
        gateway = RunningGateway(server.url, settings, ledger, load_catalogs(settings.catalog))
        header = _signed(gateway, devchain, 7, "GET", "/ticks/50?hold_after=3")
        before = _balances(devchain, 7)
        _leave_after(gateway, "/ticks/50?hold_after=3", header, 3)
        assert started.wait(30), "the stream's settlement did not start"
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        assert draining.wait(30), "the shutdown did not wait for stream settlements"
        release.set()
        stopping.join(60)
        streams.release()
        [row] = ledger.all()
        assert row.state == PaymentState.SETTLED.value and row.amount == 3 * EACH and row.tx_hash is not None
        assert _moved(devchain, 7, before) == (3 * EACH, 3 * EACH)
    finally:
        release.set()
        server.stop()
        ledger.close()
