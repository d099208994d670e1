"""/mcp reads no more of a body than max_body_bytes: a declared or counted excess is the paid path's
413 before the MCP SDK (which buffers the body whole) sees any of it; within the limit the body
reaches it exactly as sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gateway.surfaces.mcp import BodyLimit
from tests.conftest import GatewayFactory

LIMIT = 4096
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Inner:
    """The guarded app: records what it was handed, answers 200."""

    def __init__(self) -> None:
        self.received: list[Message] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.received = [await receive()]
        while self.received[-1].get("more_body"):
            self.received.append(await receive())
        self.received.append(await receive())  # after the body: the client's disconnect, passed through
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(guard: BodyLimit, chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None) -> tuple[list[Message], int]:
    """The guard's answer to a request of ``chunks``, and how many receive() calls it made."""
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ] + [{"type": "http.disconnect"}]
    calls = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers or []}
    asyncio.run(guard(scope, receive, send))
    return sent, calls


def refusal(sent: list[Message]) -> tuple[int, Any]:
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_declared_excess_is_refused_without_reading_the_body() -> None:
    inner = Inner()
    sent, calls = run(BodyLimit(inner, LIMIT), [b"x" * 10], [(b"content-length", str(LIMIT + 1).encode())])
    status, body = refusal(sent)
    assert (status, body["error"]) == (413, "request_too_large") and str(LIMIT) in body["message"]
    assert inner.received is None and calls == 0


def test_a_counted_excess_is_refused_as_soon_as_it_is_over() -> None:
    inner = Inner()
    sent, calls = run(BodyLimit(inner, LIMIT), [b"x" * 3000, b"x" * 3000, b"x" * 3000, b"x" * 3000])
    assert refusal(sent)[0] == 413
    assert inner.received is None and calls == 2  # stopped at the chunk that went over


def test_a_body_within_the_limit_reaches_the_app_as_sent() -> None:
    inner = Inner()
    chunks = [b"a" * 2000, b"b" * 2000, b"c" * (LIMIT - 4000)]
    sent, _ = run(BodyLimit(inner, LIMIT), chunks, [(b"content-length", str(LIMIT).encode())])
    assert sent[0]["status"] == 200
    assert inner.received is not None
    assert [m.get("body") for m in inner.received[:-1]] == chunks
    assert inner.received[-1] == {"type": "http.disconnect"}


def test_mcp_refuses_an_oversized_chunked_body_like_the_paid_path(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(max_body_bytes=LIMIT)
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": {"pad": "x" * (3 * LIMIT)}}}
    raw = json.dumps(message).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: only counting can tell
        for start in range(0, len(raw), 1024):
            yield raw[start:start + 1024]

    with gateway.client() as client:
        big = client.post("/mcp", content=chunked(), headers=MCP_HEADERS)
        paid = client.post("/orders", content=b'{"pad":"' + b"x" * (3 * LIMIT) + b'"}', headers=MCP_HEADERS)
        small = client.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=MCP_HEADERS)
    assert "content-length" not in big.request.headers
    assert (big.status_code, paid.status_code) == (413, 413), big.text
    assert big.json() == paid.json()  # the same code, message and next step
    assert big.headers["content-type"] == paid.headers["content-type"] == "application/json"
    assert small.status_code == 200 and small.json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
