"""Attacks on a paid stream called over MCP, on anvil: an ``upto`` tool with ``stream: true``.

Over HTTP its answer is relayed as it arrives and the settlement outcome comes last, as the
``x402-settlement`` SSE event (a risk the README states: the bytes are already gone). The MCP surface
does not stream: ``McpEndpoint._call_tool`` reads the whole inner answer before it builds the tool
result, so it must hold the content back unless the payment settled (x402-protocol.md §6.3), and a
settled one carries ``_meta["x402/payment-response"]``. It used to look only at the status (200) and
the ``PAYMENT-RESPONSE`` header (none for a stream): a stream whose settlement failed was served.
Found by a review of MCP and re-access, which found no hole in re-access (sign-ins replayed or
moved to another resource, origin, address or a refunded payment) or in MCP notifications, batches,
a huge or deeply nested ``_meta`` and unknown outcomes of tools that do not stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_attacks_surfaces import mcp_call, mcp_offer
from tests.e2e.test_upto_paid_call import _header
from tests.support import chain_actions

STREAM_PAYER = 4  # an anvil account with Permit2 approved (devchain setup): the SDK's upto client pays with it
EACH = 100  # 0.0001 per event
EVENTS = 3
MARKER = "PAID-CONTENT-"


class HeldStream:
    """An SSE upstream: ``n`` events, each with a marker that shows whether upstream content reached
    the caller. With ``hold`` set, after the first event it sets ``holding`` and waits for
    ``release``, so the test can act mid-stream without sleeping."""

    def __init__(self, hold: bool, sse: bool = True) -> None:
        self.hold, self.sse = hold, sse
        self.holding = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/stream/{n:int}", self.stream, methods=["GET"])])

    async def stream(self, request: Request) -> Response:
        n = request.path_params["n"]
        self.calls += 1

        async def events() -> AsyncIterator[bytes]:
            for i in range(1, n + 1):
                yield f'data: {{"i": {i}, "secret": "{MARKER}{i}"}}\n\n'.encode()
                if i == 1 and self.hold:
                    self.holding.set()
                    await asyncio.to_thread(self.release.wait, 30)
            yield b"data: [DONE]\n\n"

        # Not SSE: lines of JSON, counted by their bytes, ending with what a settlement event looks like
        # (the upstream's lie: only the relay's own event of an SSE stream is read; the ledger says here).
        fake = b'\nevent: x402-settlement\ndata: {"success": true, "transaction": "0xfake"}\n\n'
        media = "text/event-stream" if self.sse else "application/x-ndjson"

        async def lines() -> AsyncIterator[bytes]:
            async for event in events():
                yield event
            yield fake

        return StreamingResponse(events() if self.sse else lines(), media_type=media)


CATALOG = """
catalog: 1
owner: review-mcp-streams
payment: {{network: "eip155:31337", asset: "{token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{pay_to}", max_timeout_seconds: 120}}
upstreams:
  held: {{base_url: "{held}"}}
tools:
  - name: ticks
    description: n events, charged one unit per event delivered (upto, streamed).
    method: GET
    path: /ticks/{{n}}
    upstream: held
    upstream_path: /stream/{{n}}
    price: 0.0001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: {units}}}
    input_schema: {{type: object, properties: {{n: {{type: string}}}}, required: [n]}}
"""


@dataclass
class StreamStack:
    gateway: RunningGateway
    upstream: HeldStream


def stream_stack(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, server: ThreadServer,
                 upstream: HeldStream) -> StreamStack:
    path = tmp_path / "review-streams.yaml"
    units = "events" if upstream.sse else "bytes"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, held=server.url, units=units))
    return StreamStack(start_gateway(path), upstream)


@pytest.fixture(params=[True, False], ids=["sse", "not-sse"])
def held_stack(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, request: pytest.FixtureRequest
               ) -> Iterator[StreamStack]:
    upstream = HeldStream(hold=True, sse=request.param)
    with ThreadServer(upstream.app()) as server:
        yield stream_stack(start_gateway, devchain, tmp_path, server, upstream)
        upstream.release.set()


@pytest.fixture
def free_stack(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path) -> Iterator[StreamStack]:
    upstream = HeldStream(hold=False)
    with ThreadServer(upstream.app()) as server:
        yield stream_stack(start_gateway, devchain, tmp_path, server, upstream)


def upto_payment_over_mcp(gateway: RunningGateway, devchain: Devchain, arguments: dict[str, Any]) -> dict[str, Any]:
    """The MCP offer for ``ticks`` signed by the official SDK's upto client, as ``_meta["x402/payment"]``."""
    offer = mcp_offer(gateway.url, "ticks", arguments)
    assert offer.accepts[0].scheme == "upto", offer
    header = _header(devchain, STREAM_PAYER, offer.model_dump(mode="json", by_alias=True, exclude_none=True))
    payment: dict[str, Any] = json.loads(base64.b64decode(header))
    return payment


def result_text(result: types.CallToolResult) -> str:
    return json.dumps(result.structured_content) + json.dumps([block.model_dump() for block in result.content])


def test_an_upto_stream_whose_settlement_failed_is_not_served_over_mcp(
    held_stack: StreamStack, devchain: Devchain
) -> None:
    """Attack: a free-rider pays a streamed ``upto`` tool over MCP with a valid Permit2 payment (its
    balance covers the maximum, so verify and the simulated settle pass) and empties its balance
    while the upstream streams. The settlement at the end of the stream reverts
    (``upto_settlement_would_revert``), so the row is failed and nothing moves. Over HTTP the bytes
    were already sent (a documented residual risk). Over MCP nothing has been sent yet: the
    MCP surface buffers the whole answer, ``event: x402-settlement`` with ``success: false``
    included, and then returns it as a successful tool result (``isError: false``) with every paid
    event in ``content`` and ``structuredContent``.

    Correct behaviour (THREATS: no content without this request's own payment settled; x402 MCP
    transport §6.3: the tool's output must not be returned if settlement failed after execution):
    an ``isError`` result with the PaymentRequired (or the refusal body) and none of the stream.
    Also checked: the ledger row is failed, the payer is not charged, the payee gets nothing, and
    the upstream was called once."""
    gateway, upstream = held_stack.gateway, held_stack.upstream
    arguments = {"n": str(EVENTS)}
    payment = upto_payment_over_mcp(gateway, devchain, arguments)
    payer = devchain.address(STREAM_PAYER)
    sink = Account.create()
    chain_actions.set_eth(devchain.w3, sink.address)
    payee_before = devchain.balance(PAY_TO)
    moved = 0
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(lambda: asyncio.run(mcp_call(gateway.url, "ticks", arguments, payment)))
            assert upstream.holding.wait(30), "the paid stream never reached the upstream"
            # Mid-stream: the payer moves its whole balance away (its own key, an ordinary transfer).
            moved = chain_actions.drain(devchain.w3, devchain.token, devchain.key(STREAM_PAYER), sink.address)
            upstream.release.set()
            result = call.result(60)
    finally:
        upstream.release.set()
        if moved:
            chain_actions.transfer(devchain.w3, devchain.token, "0x" + bytes(sink.key).hex(), payer, moved)

    # The money side holds: nothing was charged and the row says so.
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.FAILED, (row.state, row.error_reason)
    assert row.tx_hash is None
    assert devchain.balance(PAY_TO) == payee_before
    assert devchain.balance(sink.address) == 0 and devchain.balance(payer) == moved  # restored, never charged
    assert upstream.calls == 1
    # The content side does not: the unpaid stream is in the tool result.
    leaked = [f"{MARKER}{i}" for i in range(1, EVENTS + 1) if f"{MARKER}{i}" in result_text(result)]
    assert not leaked and result.is_error, (
        f"MCP served the paid stream although its settlement failed (row {row.state}, {row.error_reason}, "
        f"nothing charged): isError={result.is_error}, paid events in the result: {leaked}"
    )
    assert not (result.meta or {}).get("x402/payment-response", {}).get("success")


def test_a_settled_upto_stream_over_mcp_carries_its_payment_response(
    free_stack: StreamStack, devchain: Devchain
) -> None:
    """The same gap from the honest payer's side. A streamed ``upto`` call over MCP settles, but
    the tool result has no ``_meta["x402/payment-response"]``. The receipt is only the last SSE
    event inside the ``content`` text. For ``upto`` that receipt is the only place the charged
    amount is stated, and below the signed maximum. So an MCP client cannot tell a settled call
    from the failed one above: both are ``isError: false`` with no receipt.

    Correct behaviour (x402 MCP transport §6.3): a success result carries
    ``_meta["x402/payment-response"]`` = the SettleResponse. Here that means success, the ledger
    row's transaction, and the amount that moved on chain (one unit per event)."""
    gateway = free_stack.gateway
    arguments = {"n": str(EVENTS)}
    payment = upto_payment_over_mcp(gateway, devchain, arguments)
    payer = devchain.address(STREAM_PAYER)
    before = devchain.balance(payer), devchain.balance(PAY_TO)

    result = asyncio.run(mcp_call(gateway.url, "ticks", arguments, payment))

    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == EVENTS * EACH and row.tx_hash
    assert (before[0] - devchain.balance(payer), devchain.balance(PAY_TO) - before[1]) == (EVENTS * EACH, EVENTS * EACH)
    assert free_stack.upstream.calls == 1
    assert not result.is_error and f"{MARKER}{EVENTS}" in result_text(result)
    receipt = (result.meta or {}).get("x402/payment-response")
    assert receipt is not None, (
        f"a settled upto stream over MCP (tx {row.tx_hash}, {row.amount} charged) has no x402/payment-response: "
        f"meta={result.meta}"
    )
    assert receipt["success"] is True and receipt["transaction"] == row.tx_hash
    assert receipt["amount"] == str(EVENTS * EACH)
