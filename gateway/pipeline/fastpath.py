"""The unpaid fast path: a call to a tool without a payment, answered with its 402 cheaply.

Most calls an x402 gateway sees carry no payment: an agent asks, gets the offer, signs and asks
again. Their answer depends only on the request line and the Host header, so this runs the
pipeline's own chain (``gateway.pipeline.chain``) up to ``challenge`` in two halves: the stages
marked ``shape_only`` (route, body, arguments, offer) and the 402 they lead to once per distinct
request, kept; the others (header limits, the safety checks before a 402) on every request, in
the chain's order, followed by the audit record, the metrics and X-Request-Id as the pipeline
gives them. There is no stage logic here: a check added to the chain's prefix runs here too.

It wraps the app's whole middleware stack, so it adds CORS's headers itself: through the app's
own ``CORSMiddleware.send`` when the request has an Origin, and the ``Vary: Origin`` that
middleware adds to every other answer, prebuilt. It answers only a request to a catalog route that
no other route of the app shadows, not OPTIONS, with no payment header, no body, and a plain ASCII
path (no percent-encoding), whose shape-only stages pass. Anything else, including anything those
stages refuse (404, 405, 422...), goes on to the app unchanged, except two kinds. A call with a
body (or a paid HEAD) to such a path goes straight to the pipeline (``_direct``), as the app's
catch-all route would hand it over, with the same CORS headers. What that skips is Starlette's
exception middlewares and the walk along the app's other routes. A paid call without a body goes
further (``_paid``): its shape is the unpaid call's of the same key, so the shape-only stages'
results are taken from what is kept (the quote in the payment header's protocol version, as
``offer`` writes it) and the chain runs from the stage after them (with tracing on, the whole chain,
so its trace shows every stage). The kept shape and its 402 are always computed without the payment
headers, so a paid call never shapes an unpaid one's 402.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from catalog import Tool
from gateway.headers import PAYMENT_SIGNATURE, REQUEST_ID, X_PAYMENT, lower
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import RequestContext
from gateway.protocol.offers import Quote
from gateway.upstream.trimming import AnswerRequest

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

__all__ = ["CachedResponse", "UnpaidFastPath"]

# ``_key``'s answer (compared by identity) for a call the pipeline takes straight (``UnpaidFastPath._direct``).
_DIRECT: tuple[tuple[Any, ...], bool, int] = ((), False, 0)
MAX_ENTRIES = 1024  # distinct (method, path, query, host) answers kept; a few KB each
MAX_KEY_CHARS = 2048  # of path, query and Host together: a request with a longer key is answered, not kept
_PAYMENT_SIGNATURE = lower(PAYMENT_SIGNATURE).encode()
_X_PAYMENT = lower(X_PAYMENT).encode()
_REQUEST_ID = lower(REQUEST_ID).encode()


class CachedResponse(Response):
    """A response rendered once: status, headers and body as they go on the wire. It skips
    ``Response.__init__`` on purpose, which would render the same 402 again on every request."""

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.body = body
        self.background = None


@dataclass(frozen=True, slots=True)
class _Shape:
    """One distinct unpaid request: what the chain's shape-only stages wrote on its context, and
    the 402 ``challenge`` rendered from it, minus what each request adds."""

    tool: Tool
    compiled: CompiledTool
    path: str  # as the pipeline reads it (``request.url.path``)
    query: str
    params: dict[str, str]
    arguments: dict[str, Any]
    answer_request: AnswerRequest | None  # the x402gw_* parameters (``arguments``): a paid call's answer reads it
    quote: Quote
    code: str  # the 402's reason
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # of the 402, X-Request-Id not yet added
    body: bytes
    cors_tail: tuple[tuple[bytes, bytes], ...]  # what CORS adds after X-Request-Id without an Origin

    def context(self, scope: Scope, quote: Quote, **more: Any) -> RequestContext:
        """A request's context holding what the shape-only stages wrote for this shape (its own
        copies of what a later stage may change), with ``quote`` and ``more``."""
        client = scope.get("client")
        return RequestContext(
            method=scope["method"], path=self.path, query=self.query, client=client[0] if client else None,
            raw_headers=scope["headers"], tool=self.tool, compiled=self.compiled, params=dict(self.params),
            arguments=dict(self.arguments), answer_request=self.answer_request, quote=quote, **more,
        )

    def response(self, request_id: str) -> CachedResponse:
        return CachedResponse(self.status, [*self.headers, (_REQUEST_ID, request_id.encode())], self.body)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class UnpaidFastPath:
    def __init__(
        self, app: ASGIApp, *, pipeline: Pipeline, cors: CORSMiddleware, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.pipeline = pipeline
        self.chain = pipeline.chain
        # With tracing on, a paid call's trace shows every stage: it goes to the pipeline whole.
        self.paid_shapes = pipeline.tracing is None
        self.cors = cors  # the app's CORS settings: its ``send`` adds CORS headers to an answer
        # Routes the app tries before the catalog's catch-all: a path one of them may take is not ours.
        self._shadowed_literal: set[str] = set()
        self._shadowed_patterns: list[re.Pattern[str]] = []
        self.enabled = True
        for other in routes:
            regex = getattr(other, "path_regex", None)
            if isinstance(other, Route) and not other.param_convertors:
                self._shadowed_literal.add(other.path)
            elif isinstance(regex, re.Pattern):
                self._shadowed_patterns.append(regex)
            else:
                self.enabled = False  # a route we cannot reason about: leave every request to the app
        self._entries: dict[tuple[Any, ...], _Shape | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._key(scope) if scope["type"] == "http" and self.enabled else None
        if found is _DIRECT:
            await self._direct(scope, receive, send)
            return
        if found is None:
            await self.app(scope, receive, send)
            return
        key, origin, version = found
        if version and not self.paid_shapes:
            await self._direct(scope, receive, send)
            return
        try:
            entry = self._entries[key]
        except KeyError:
            entry = await self._remember(key, scope)
        if version:  # a paid call without a body: its shape is the unpaid call's
            await (self._direct(scope, receive, send) if entry is None else self._paid(scope, receive, send, entry, version))
            return
        if entry is None:
            await self.app(scope, receive, send)
            return
        ctx = entry.context(scope, entry.quote)
        response = await self.chain.answer(ctx, self.chain.run_cached(ctx, entry))
        if isinstance(response, CachedResponse) and not origin:
            response.raw_headers.extend(entry.cors_tail)
        else:
            if not isinstance(response, CachedResponse):
                response.headers[REQUEST_ID] = ctx.request_id  # a refusal: as the pipeline adds it
            send = self._with_cors(scope, send)
        await response(scope, receive, send)

    async def _paid(self, scope: Scope, receive: Receive, send: Send, entry: _Shape, version: int) -> None:
        """A paid call without a body: the pipeline's, from the stage after the shape-only ones,
        with what they wrote taken from the unpaid call of the same key (the quote in the payment
        header's protocol version, as ``offer`` would write it), as ``_direct`` answers it."""
        quote = entry.quote if entry.quote.version == version else replace(entry.quote, version=version)
        ctx = entry.context(scope, quote, request=Request(scope, receive, send), paying=True)
        response = await self.chain.answer(ctx, self.chain.run_paid(ctx))
        response.headers[REQUEST_ID] = ctx.request_id
        await response(scope, receive, self._with_cors(scope, send))

    async def _direct(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A call with a body (or a paid call no kept shape serves), to a path only the catalog's catch-all route takes:
        straight to the pipeline, as that route would hand it over, with the CORS headers the
        app's ``CORSMiddleware`` adds; Starlette's exception middlewares and the walk along the
        app's other routes are what is skipped (the pipeline answers every refusal itself)."""
        response = await self.pipeline.handle(Request(scope, receive, send))
        await response(scope, receive, self._with_cors(scope, send))

    def _with_cors(self, scope: Scope, send: Send) -> Send:
        """``send`` through the app's ``CORSMiddleware.send``: the CORS headers it adds to an answer."""
        return functools.partial(self.cors.send, send=send, request_headers=Headers(scope=scope))

    def _key(self, scope: Scope) -> tuple[tuple[Any, ...], bool, int] | None:
        """The cache key of this request, whether it came with an Origin and the protocol version
        of its payment header (0: none), if it is one the fast path may answer; ``_DIRECT`` for a
        call with a body (or a paid HEAD, or no Host) the pipeline answers without the app's
        routing; else None."""
        path: str = scope["path"]
        raw_path = scope.get("raw_path")
        if (
            scope["method"] == "OPTIONS"  # CORS preflights are the CORS middleware's
            or scope.get("root_path")
            or raw_path is None
            or b"%" in raw_path
            or b"\\" in raw_path
            or not path.isascii()
            or path in self._shadowed_literal
        ):
            return None
        host = None
        origin = False
        version = 0  # as ``offer`` reads it: PAYMENT-SIGNATURE (v2) first, else X-PAYMENT (v1)
        direct = False
        for name, value in scope["headers"]:
            if name == b"host":
                if host is None:
                    host = value
            elif name == b"origin":
                origin = True
            elif name == _PAYMENT_SIGNATURE:
                version = 2
            elif name == _X_PAYMENT:
                version = version or 1
            elif name == b"transfer-encoding" or name == b"content-length" and value != b"0":
                direct = True
        if version or direct:
            if any(pattern.match(path) for pattern in self._shadowed_patterns):
                return None
            if direct or host is None or scope["method"] == "HEAD":
                return _DIRECT
        elif host is None:
            return None  # without a Host, the URL is the server's
        server = scope.get("server")  # the URL's host when the Host header is unusable
        key = (scope["method"], path, scope.get("query_string", b""), host, scope.get("scheme"),
               None if server is None else tuple(server))
        return key, origin, version

    async def _remember(self, key: tuple[Any, ...], scope: Scope) -> _Shape | None:
        shadowed = any(pattern.match(scope["path"]) for pattern in self._shadowed_patterns)
        entry = None if shadowed else await self._compute(scope)
        if len(key[1]) + len(key[2]) + len(key[3]) > MAX_KEY_CHARS:
            return entry  # not kept: 1024 keys of 60 KB paths would pin 60 MB (a tool's URL is far shorter)
        entries = self._entries
        if len(entries) >= MAX_ENTRIES:
            del entries[next(iter(entries))]  # the oldest
        entries[key] = entry  # None too: a request the pipeline must answer is not examined again
        return entry

    async def _compute(self, scope: Scope) -> _Shape | None:
        """The chain's shape-only stages and the 402 they lead to, without side effects; None if
        any would refuse."""
        try:
            # A paid call's shape is its unpaid call's: the 402 kept for the key is the unpaid one.
            unpaid = [(name, value) for name, value in scope["headers"] if name not in (_PAYMENT_SIGNATURE, _X_PAYMENT)]
            scope = {**scope, "headers": unpaid}
            request = Request(scope, _no_body)
            url = request.url
            ctx = RequestContext(method=scope["method"], path=url.path, query=url.query, client=None,
                                 raw_headers=scope["headers"], request=request)
            challenge = await self.chain.run_shape(ctx)
            if challenge is None:
                return None
            response = challenge.to_response()
        except Exception:  # noqa: BLE001 - a GatewayError (404, 405, 422...) or worse: the pipeline answers it
            return None
        assert ctx.tool is not None and ctx.compiled is not None and ctx.quote is not None
        # Without an Origin, CORSMiddleware.send adds (or extends) Vary: Origin and nothing else.
        headers = MutableHeaders(raw=[*response.raw_headers, (_REQUEST_ID, b"")])
        headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
        tail = headers.raw[len(response.raw_headers) + 1:]
        if headers.raw[:len(response.raw_headers) + 1] != [*response.raw_headers, (_REQUEST_ID, b"")]:
            return None  # CORS would change a header we prebuilt: let the app answer
        return _Shape(
            tool=ctx.tool, compiled=ctx.compiled, path=ctx.path, query=ctx.query, params=ctx.params,
            arguments=ctx.arguments, answer_request=ctx.answer_request, quote=ctx.quote, code=challenge.code,
            status=response.status_code,
            headers=tuple(response.raw_headers), body=bytes(response.body), cors_tail=tuple(tail),
        )
