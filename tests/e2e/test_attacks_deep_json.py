"""JSON nested deeper than the stack, on the money paths of usage-priced (``upto``) and argument-priced calls.

Each gateway here runs as its own process (``x402gw serve``), so a gateway that dies shows as a
dead process (and a failing test) instead of taking pytest down with it. The invariant checked
beside every status: the ledger rows, the chain balances and the upstream's call counts.

Root cause of the holes below (fixed in ``settlement/__init__.py``, which puts the limit back): importing the chain stack (``py_ecc``, pulled in by eth-account and
web3) raises the interpreter's recursion limit to 100,000 (``sys.setrecursionlimit``), which is far
beyond what the C stack holds. ``json.loads`` recurses in C once per nesting level and checks that
limit to raise ``RecursionError``: with it at 100,000 the process overflows its stack first and
dies with SIGSEGV. Every ``json.loads`` of foreign bytes in the gateway (the meter reading an
upstream's usage, the arguments stage reading a request body) is therefore a kill switch: a few
hundred KB of ``[`` brackets, far below the size limits, end the whole server, every payer's call
in flight with it.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.http.clients.httpx import PaymentError

from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain
from tests.e2e.test_upto_paid_call import _client
from tests.support.processes import GatewayProcess

EACH = 1_000  # 0.001 per unit, 6 decimals
DEPTH = 200_000  # nesting levels: 400 KB, under the 1 MiB body and 10 MiB upstream limits

CATALOG = """
catalog: 1
owner: acme-review
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  metered:
    base_url: "{upstream}"
tools:
  - name: metered
    description: Charged 0.001 per unit its answer reports, at most 0.01.
    method: GET
    path: /metered/{{mode}}
    upstream: metered
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: echo
    description: A POST tool charged by the units its answer reports.
    method: POST
    path: /echo
    upstream: metered
    upstream_path: /echo
    price: 0.001
    max_price: 0.01
    settle: after
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units}}
    input_schema:
      type: object
      properties:
        text: {{}}
      required: [text]
"""


class NestingUpstream:
    """``GET /usage/json-N``: N units; ``GET /usage/nested``: a usage value nested ``DEPTH`` deep
    (a lying upstream); ``POST /echo``: one unit. Every answer carries a unique marker."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._markers = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/usage/{mode}", self.usage, methods=["GET"]),
                                 Route("/echo", self.echo, methods=["POST"])])

    async def usage(self, request: Request) -> Response:
        mode = request.path_params["mode"]
        self.calls[mode] += 1
        marker = f"REVIEW-CONTENT-{next(self._markers)}"
        if mode == "nested":
            units = b"[" * DEPTH + b"]" * DEPTH
            body = b'{"served": "' + marker.encode() + b'", "usage": {"units": ' + units + b"}}"
            return Response(body, media_type="application/json")
        kind, _, number = mode.partition("-")
        if kind == "json" and number.isdigit():
            return JSONResponse({"served": marker, "usage": {"units": int(number)}})
        return JSONResponse({"served": marker})

    async def echo(self, request: Request) -> Response:
        self.calls["echo"] += 1
        return JSONResponse({"served": f"REVIEW-CONTENT-{next(self._markers)}", "usage": {"units": 1}})


@pytest.fixture(scope="module")
def nesting() -> Iterator[tuple[str, NestingUpstream]]:
    upstream = NestingUpstream()
    with ThreadServer(upstream.app()) as server:
        yield server.url, upstream


@pytest.fixture
def process(devchain: Devchain, tmp_path: Path, nesting: tuple[str, NestingUpstream]) -> Iterator[GatewayProcess]:
    catalog = tmp_path / "review.yaml"
    catalog.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=nesting[0]))
    env = {
        "X402GW_CATALOG": str(catalog),
        "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
        "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "X402GW_RECEIPT_TIMEOUT_SECONDS": "10",
    }
    gateway = GatewayProcess(env, tmp_path, tmp_path / "gateway.log").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _rows(tmp_path: Path) -> list[Any]:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        return list(ledger.all())
    finally:
        ledger.close()


def _balances(devchain: Devchain, payer: int) -> tuple[int, int]:
    return devchain.balance(devchain.address(payer)), devchain.balance(PAY_TO)


def _pay(url: str, devchain: Devchain, payer: int, path: str, body: dict[str, Any] | None = None) -> tuple[httpx.Response, Any]:
    """One call paid by the official SDK's upto client: the answer and its settlement receipt."""

    async def call() -> tuple[httpx.Response, Any]:
        async with x402HttpxClient(_client(devchain, payer), timeout=30) as http:
            response = await (http.post(url + path, json=body) if body is not None else http.get(url + path))
            receipt = x402HTTPClient(_client(devchain, payer)).get_payment_settle_response(response.headers.get) \
                if "payment-response" in response.headers else None
            return response, receipt

    return asyncio.run(call())


def _alive(gateway: GatewayProcess, attack: str, dropped: bool) -> None:
    assert gateway.process is not None
    if dropped:  # the connection closed unanswered: a dying process closes its sockets before it is reaped
        try:
            gateway.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
    code = gateway.process.poll()
    assert code is None, (
        f"{attack} killed the gateway process (exit {code}; -11 is SIGSEGV: json.loads overflowed the C stack "
        f"under py_ecc's recursion limit of 100000). Log tail: {gateway.log_tail()[-800:]}"
    )


def test_a_usage_answer_nested_deeper_than_the_stack_is_withheld_not_a_crash(
    process: GatewayProcess, devchain: Devchain, tmp_path: Path, nesting: tuple[str, NestingUpstream],
) -> None:
    """Attack (malicious upstream, usage lie): a usage-priced call whose upstream reports its units
    as an array nested 200,000 deep (400 KB, well under the 10 MiB answer limit). The meter
    (``gateway.upstream.usage._document``) hands the body to ``json.loads``, which recurses in C
    per level; under the recursion limit of 100,000 that py_ecc sets on import, the gateway
    process segfaults before any ``RecursionError`` (which ``_document`` would not catch either:
    it catches only ``ValueError``/``UnicodeDecodeError``). Every call in flight dies with it.

    Correct: the usage is unreadable, so the answer is withheld (502 ``usage_unreadable``), the
    payment voided, nothing charged (chain balances unchanged), the upstream called once, and the
    gateway goes on serving: the next honest payer is charged exactly its 2 units."""
    attacker, honest = 6, 7
    before, calls = _balances(devchain, attacker), nesting[1].calls["nested"]
    dropped = ""
    try:
        response, _ = _pay(process.url, devchain, attacker, "/metered/nested")
    except (httpx.TransportError, PaymentError) as exc:  # the connection died with the process
        response = None
        dropped = repr(exc)
    _alive(process, "an upstream answering a usage-priced call with deeply nested JSON", response is None)
    assert response is not None, dropped
    assert response.status_code == 502, response.text[:500]
    assert response.json()["error"] == "usage_unreadable"
    assert "REVIEW-CONTENT-" not in response.text  # the lying answer is not served
    assert nesting[1].calls["nested"] == calls + 1
    assert _balances(devchain, attacker) == before  # nothing charged
    [row] = _rows(tmp_path)
    assert row.state == PaymentState.VOIDED and (row.error_reason or "").startswith("usage_")

    before = _balances(devchain, honest)
    served, receipt = _pay(process.url, devchain, honest, "/metered/json-2")
    assert served.status_code == 200 and receipt.amount == str(2 * EACH), served.text
    now = _balances(devchain, honest)
    assert (before[0] - now[0], now[1] - before[1]) == (2 * EACH, 2 * EACH)


def test_a_request_body_nested_deeper_than_the_stack_is_a_400_not_a_crash(
    process: GatewayProcess, devchain: Devchain, tmp_path: Path, nesting: tuple[str, NestingUpstream],
) -> None:
    """Attack (griefer, no payment, no key): a POST to any tool with a JSON body whose argument is
    an array nested 200,000 deep (400 KB, under the 1 MiB body limit). The arguments stage
    (``collect_arguments``), which must parse the body to price the call, calls ``json.loads``;
    it catches ``RecursionError``, but under py_ecc's recursion limit of 100,000 the C parser
    overflows the stack first and the process dies with SIGSEGV: one unauthenticated request ends
    the gateway and every paid call in flight (money moved, answers never delivered).

    Correct: 400 ``invalid_json_body`` (too deeply nested) before any offer; no ledger row, no
    upstream call; the gateway goes on serving, and an honest paid call settles its 1 unit."""
    before, calls = _balances(devchain, 8), nesting[1].calls["echo"]
    dropped = ""
    body = b'{"text": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    try:
        with httpx.Client(timeout=30) as http:
            refused: httpx.Response | None = http.post(process.url + "/echo", content=body,
                                                        headers={"content-type": "application/json"})
    except httpx.TransportError as exc:
        refused = None
        dropped = repr(exc)
    _alive(process, "an unpaid POST whose JSON body nests 200,000 deep", refused is None)
    assert refused is not None, dropped
    assert refused.status_code == 400, refused.text[:500]
    assert refused.json()["error"] == "invalid_json_body"
    assert nesting[1].calls["echo"] == calls and _rows(tmp_path) == []

    served, receipt = _pay(process.url, devchain, 8, "/echo", {"text": "hello"})
    assert served.status_code == 200 and receipt.amount == str(EACH), served.text
    assert nesting[1].calls["echo"] == calls + 1
    [row] = _rows(tmp_path)
    assert row.state == PaymentState.SETTLED and row.amount == EACH
    now = _balances(devchain, 8)
    assert (before[0] - now[0], now[1] - before[1]) == (EACH, EACH)
