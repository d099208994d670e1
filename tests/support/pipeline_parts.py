"""Pieces for driving pipeline stages one at a time: the demo catalog compiled as the pipeline
compiles it, a request context around a real Starlette request, and a facilitator fake."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.types import Message

from catalog import Catalogs, Router, load_catalogs
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import RequestContext
from gateway.settings import DEFAULT_CATALOG
from settlement.x402.wire import (
    PaymentPayload,
    PaymentRequirements,
    SettleResponse,
    VerifyResponse,
)

HOST = "gw.test"


def demo_catalogs() -> Catalogs:
    return load_catalogs([DEFAULT_CATALOG])


def compiled_tools(catalogs: Catalogs) -> dict[str, CompiledTool]:
    return {tool.name: CompiledTool(tool) for tool in catalogs.tools}


def demo_router(catalogs: Catalogs) -> Router:
    return Router(catalogs.tools)


def context(
    method: str, path: str, query: str = "", headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
    client: str = "203.0.113.7",
) -> RequestContext:
    """A context as ``Pipeline.handle`` makes it, around a request that carries ``body``."""
    raw = [(name.lower().encode(), value.encode()) for name, value in headers]
    if not any(name == b"host" for name, _ in raw):
        raw.append((b"host", HOST.encode()))
    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": raw, "scheme": "http", "server": (HOST, 80),
        "client": (client, 50000), "http_version": "1.1",
    }
    sent = [False]

    async def receive() -> Message:
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, receive)
    return RequestContext(method=method, path=path, query=query, client=client, raw_headers=raw, request=request)


class FakeFacilitator:
    """Answers verify and settle as told; counts the calls."""

    def __init__(self, verify: VerifyResponse | Exception, settle: SettleResponse | Exception | None = None) -> None:
        self.verify_answer = verify
        self.settle_answer = settle
        self.calls: list[str] = []

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        self.calls.append("verify")
        if isinstance(self.verify_answer, Exception):
            raise self.verify_answer
        return self.verify_answer

    async def settle(self, payload: PaymentPayload, requirements: PaymentRequirements, **_: object) -> SettleResponse:
        self.calls.append("settle")
        if isinstance(self.settle_answer, Exception) or self.settle_answer is None:
            raise self.settle_answer or AssertionError("settle was not expected")
        return self.settle_answer
