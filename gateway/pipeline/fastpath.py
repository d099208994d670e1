"""The unpaid fast path: a call to a tool without a payment, answered with its 402 cheaply.

Most calls an x402 gateway sees carry no payment: an agent asks, gets the offer, signs and asks
again. Their answer depends only on the request line and the Host header, so the parts the
pipeline would rebuild each time (route, arguments and their validation, the offer, the 402's body
and PAYMENT-REQUIRED header) are computed once per distinct request, by the pipeline's own stage
functions, and kept. Everything that can change between two identical requests runs every time,
in the pipeline's order: the header size check, the safety checks before a 402 (kill switch, price
guard, circuit breaker, per-client rate limit), the audit record, the metrics, X-Request-Id.

It wraps the app's whole middleware stack, so it adds CORS's headers itself: through the app's
own ``CORSMiddleware.send`` when the request has an Origin, and the ``Vary: Origin`` that
middleware adds to every other answer, prebuilt. It answers only a request to a catalog route that
no other route of the app shadows, not OPTIONS, with no payment header, no body, and a plain ASCII
path (no percent-encoding), whose arguments validate. Anything else, including anything the
pipeline refuses before the safety checks (404, 405, 422...), goes on to the app unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from catalog import Tool
from gateway.pipeline.context import RequestContext
from gateway.protocol.offers import Quote, request_binding
from gateway.pipeline.stages.challenge import PaymentChallenge, challenge_issued, collect_arguments, validate_arguments
from gateway.pipeline.stages.route import route
from settlement.x402.wire import PaymentRequirements

if TYPE_CHECKING:
    from gateway.pipeline.pipeline import Pipeline

__all__ = ["UnpaidFastPath"]

MAX_ENTRIES = 1024  # distinct (method, path, query, host) answers kept; a few KB each
_PAYMENT_HEADERS = frozenset({b"payment-signature", b"x-payment"})


@dataclass(frozen=True, slots=True)
class _Challenge:
    """What one distinct unpaid request is answered with, minus what each request adds."""

    tool: Tool
    path: str  # as the pipeline reads it (``request.url.path``)
    query: str
    params: dict[str, str]
    arguments: dict[str, Any]
    amount: int
    requirements: PaymentRequirements
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # of the 402, X-Request-Id not yet added
    body: bytes
    cors_tail: tuple[tuple[bytes, bytes], ...]  # what CORS adds after X-Request-Id without an Origin

    def response(self, request_id: str) -> _Prebuilt:
        response = _Prebuilt.__new__(_Prebuilt)  # the fields Response.__init__ would set, prebuilt
        response.status_code = self.status
        response.background = None
        response.body = self.body
        response.raw_headers = [*self.headers, (b"x-request-id", request_id.encode())]
        return response


class _Prebuilt(Response):
    """A 402 from the cache: status, headers (X-Request-Id included) and body already rendered."""


class UnpaidFastPath:
    def __init__(
        self, app: ASGIApp, *, pipeline: Pipeline, cors: CORSMiddleware, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.pipeline = pipeline
        self.cors = cors  # the app's CORS settings: its ``send`` adds CORS headers to an answer
        self.max_header_bytes = pipeline.safety.limits.max_header_bytes
        # Routes the app tries before the catalog's catch-all: a path one of them may take is not ours.
        self._shadowed_literal: set[str] = set()
        self._shadowed_patterns: list[Any] = []
        self.enabled = True
        for other in routes:
            if isinstance(other, Route) and not other.param_convertors:
                self._shadowed_literal.add(other.path)
            elif isinstance(getattr(other, "path_regex", None), re.Pattern):
                self._shadowed_patterns.append(other.path_regex)
            else:
                self.enabled = False  # a route we cannot reason about: leave every request to the app
        self._entries: dict[tuple[Any, ...], _Challenge | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope) if scope["type"] == "http" and self.enabled else None
        if found is None:
            await self.app(scope, receive, send)
            return
        entry, origin = found
        client = scope.get("client")
        ctx = RequestContext(
            method=scope["method"], path=entry.path, query=entry.query, client=client[0] if client else None,
            tool=entry.tool, params=dict(entry.params), arguments=dict(entry.arguments),
        )
        response = await self.pipeline.answer(ctx, self._challenge(ctx, entry))
        if isinstance(response, _Prebuilt) and not origin:
            response.raw_headers.extend(entry.cors_tail)
        else:
            if not isinstance(response, _Prebuilt):
                response.headers["X-Request-Id"] = ctx.request_id  # a refusal: as the pipeline adds it
            send = functools.partial(self.cors.send, send=send, request_headers=Headers(scope=scope))
        await response(scope, receive, send)

    async def _challenge(self, ctx: RequestContext, entry: _Challenge) -> Response:
        # The pipeline's unpaid branch, in its order, from "before_challenge" on.
        safety = self.pipeline.safety
        await safety.before_challenge(ctx, entry.tool, entry.amount, paying=False)
        await safety.per_client(ctx, entry.tool)
        challenge_issued(ctx, entry.requirements)
        ctx.reason = "payment_required"  # what the pipeline's PaymentChallenge sets
        return entry.response(ctx.request_id)

    def _match(self, scope: Scope) -> tuple[_Challenge, bool] | None:
        """The cached answer for this request, and whether it came with an Origin, if it is one
        the fast path may give; else None."""
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
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            if name == b"host":
                if host is None:
                    host = value
            elif name == b"origin":
                origin = True
            elif name in _PAYMENT_HEADERS or name == b"transfer-encoding":
                return None
            elif name == b"content-length" and value != b"0":
                return None
        if size > self.max_header_bytes or host is None:
            return None  # the pipeline answers 431; without a Host, the URL is the server's
        server = scope.get("server")  # the URL's host when the Host header is unusable
        key = (scope["method"], path, scope.get("query_string", b""), host, scope.get("scheme"),
               None if server is None else tuple(server))
        entries = self._entries
        try:
            entry = entries[key]
        except KeyError:
            shadowed = any(pattern.match(path) for pattern in self._shadowed_patterns)
            entry = None if shadowed else self._compute(scope)
            if len(entries) >= MAX_ENTRIES:
                del entries[next(iter(entries))]  # the oldest
            entries[key] = entry  # None too: a request the pipeline must answer is not examined again
        return None if entry is None else (entry, origin)

    def _compute(self, scope: Scope) -> _Challenge | None:
        """The pipeline's stages up to the 402, without side effects; None if any would refuse."""
        pipeline = self.pipeline
        try:
            request = Request(scope)
            url = request.url
            method = scope["method"]
            ctx = RequestContext(method=method, path=url.path, query=url.query, client=None)
            match = route(pipeline.router, method, ctx.path, scope.get("raw_path"))
            tool = match.tool
            compiled = pipeline.tools[tool.name]
            arguments = collect_arguments(tool, match.params, request.query_params.multi_items(), b"", method)
            validate_arguments(compiled.validator, arguments)
            offer = compiled.offer
            binding = request_binding(method, ctx.path, ctx.query)
            quote = Quote(
                offer, offer.bound(binding), pipeline.resource_url(request, ctx), pipeline.challenge_body_version,
                binding,
            )
            response = PaymentChallenge.unpaid(quote, compiled.price_text).to_response()
        except Exception:  # noqa: BLE001 - a GatewayError (404, 405, 422...) or worse: the pipeline answers it
            return None
        # Without an Origin, CORSMiddleware.send adds (or extends) Vary: Origin and nothing else.
        headers = MutableHeaders(raw=[*response.raw_headers, (b"x-request-id", b"")])
        headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
        tail = headers.raw[len(response.raw_headers) + 1:]
        if headers.raw[:len(response.raw_headers) + 1] != [*response.raw_headers, (b"x-request-id", b"")]:
            return None  # CORS would change a header we prebuilt: let the app answer
        return _Challenge(
            tool=tool, path=ctx.path, query=ctx.query, params=match.params, arguments=arguments,
            amount=int(quote.requirements.amount), requirements=quote.requirements, status=response.status_code,
            headers=tuple(response.raw_headers), body=bytes(response.body), cors_tail=tuple(tail),
        )
