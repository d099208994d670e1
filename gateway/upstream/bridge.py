"""Stage 5, bridge: the only stage that calls an upstream.

Reads the tool's arguments, writes one upstream request (REST as mapped by the catalog, or a SOAP
envelope), retries and fails over as the upstream's policy allows, and turns the answer into what
the agent gets: the upstream's JSON, the SOAP result as JSON, or the common error model
``{"error", "message", "retryable", "upstreamStatus"}`` with a non-2xx status (never settled).
Stops with 502 (unreachable, fault, rejected, redirected), 504 (timeout), or the upstream's own
4xx/5xx.

``UpstreamClient`` is the seam: the default implementation is one pooled ``aiohttp`` session.
URLs come only from the catalog; redirects are never followed (a 3xx is 502 ``upstream_redirect``,
its body and Location dropped); hop-by-hop, cookie and payment headers never cross, either way;
credentials are added here and nowhere logged.

Only what was validated goes upstream: the request body is the tool's JSON-body arguments (or the
catalog's ``request.body`` mapping of its arguments) re-serialised as ``application/json``, never
the client's bytes or Content-Type; a GET, HEAD or DELETE without a body mapping sends no body.

``UpstreamFailure`` and the catalog's failure rules are in ``gateway.upstream.failures``
(``UpstreamFailure`` is re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from lxml import etree

from catalog import Tool
from catalog.bridge import RetryPolicy
from gateway import codes
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import ACCEPT, CONTENT_TYPE, REQUEST_ID, RETRY_AFTER, lower
from gateway.upstream.answers import (
    _MESSAGE_LIMIT,
    IDEMPOTENT_METHODS,
    RETRYABLE_STATUS,
    backoff_seconds,
    error_response,
    retry_after_seconds,
)
from gateway.upstream.answers import upstream_message as _upstream_message
from gateway.upstream.credentials import Credentials, CredentialsError, resolve_credentials
from gateway.upstream.documents import dumps as _dumps
from gateway.upstream.documents import json_or_none as _json_or_none
from gateway.upstream.documents import resolve_pointer
from gateway.upstream.documents import set_pointer as _set_pointer
from gateway.upstream.documents import text as _text
from gateway.upstream.failures import CompiledRule, UpstreamFailure, check_rules, compile_rule
from gateway.upstream.soap import (
    SoapArgumentError,
    SoapDefinitionError,
    SoapRequestBuilder,
    element_to_json,
    find_fault,
    find_result,
    parse_xml,
)
from gateway.upstream.soap import content_type as soap_content_type
from gateway.upstream.transport import (
    DROPPED_RESPONSE_HEADERS,
    DROPPED_RESPONSE_PREFIXES,
    FORWARDED_REQUEST_HEADERS,
    AiohttpUpstreamClient,
    StreamedResponse,
    UpstreamClient,
    UpstreamResponse,
    UpstreamUnreachable,
    forwarded_response_header,
)
from gateway.upstream.transport import strip_headers as _strip_headers

__all__ = [
    "DROPPED_RESPONSE_HEADERS",
    "DROPPED_RESPONSE_PREFIXES",
    "FORWARDED_REQUEST_HEADERS",
    "AiohttpUpstreamClient",
    "Bridge",
    "BridgeConfigError",
    "UpstreamClient",
    "UpstreamFailure",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "backoff_seconds",
    "error_response",
    "forwarded_response_header",
    "resolve_pointer",
    "retry_after_seconds",
    "upstream_target",
    "upstream_url",
]

log = logging.getLogger("x402gw.bridge")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Characters an upstream header value cannot hold (HTTP clients refuse CR and LF with an exception).
_HEADER_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


class BridgeConfigError(GatewayConfigError):
    """A tool's upstream cannot be prepared (credentials, WSDL, failure rules): the gateway does not start."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


def _refuse_redirect(response: UpstreamResponse) -> None:
    """A 3xx is not the content paid for, and is never followed: nothing of it (body, Location)
    reaches the agent, and nothing is charged."""
    if 300 <= response.status < 400:
        raise UpstreamFailure(
            codes.UPSTREAM_REDIRECT, "the upstream answered with a redirect, which is not followed; nothing was charged",
            status=502, retryable=False, upstreamStatus=response.status,
        )


def upstream_url(tool: Tool, params: dict[str, str], query: str) -> str:
    return tool.upstream.base_url + upstream_target(tool, params, query)


def upstream_target(tool: Tool, params: dict[str, str], query: str) -> str:
    path = tool.upstream_path
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return f"{path}?{query}" if query else path


# -- compiled per tool ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    tool: Tool
    credentials: Credentials
    soap: SoapRequestBuilder | None
    rules: tuple[CompiledRule, ...]


class Bridge:
    """Every tool's upstream call, prepared once: credentials read, WSDLs loaded, XPaths compiled.

    ``sleep`` and ``draw`` (a random number in [0, 1)) are seams for tests of the backoff."""

    def __init__(
        self,
        tools: Iterable[Tool],
        *,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.sleep = sleep
        self.draw = draw
        self._routes: dict[str, _Route] = {}
        credentials: dict[tuple[str, str], Credentials] = {}
        for tool in tools:
            key = (tool.owner, tool.upstream.name)
            if key not in credentials:
                try:
                    credentials[key] = resolve_credentials(
                        tool.upstream.auth, f"catalog of {tool.owner}: upstream {tool.upstream.name}", environ
                    )
                except CredentialsError as exc:
                    raise BridgeConfigError(exc.message, exc.code) from None
            soap = None
            if tool.kind == "soap" and tool.soap is not None:
                try:
                    soap = SoapRequestBuilder(tool.soap, tool.input_schema)
                except SoapDefinitionError as exc:
                    raise BridgeConfigError(f"tool {tool.name}: {exc}", "soap_definition_invalid") from None
            rules: list[CompiledRule] = []
            for rule in tool.failure_when:
                try:
                    rules.append(compile_rule(rule))
                except etree.XPathSyntaxError:
                    raise BridgeConfigError(f"tool {tool.name}: failure rule xpath {rule.xpath!r} is invalid", "invalid_xpath") from None
            self._routes[tool.name] = _Route(tool, credentials[key], soap, tuple(rules))

    def max_call_seconds(self, tool: Tool) -> float:
        """The longest one call of this tool can take with every retry, for lock lifetimes."""
        return tool.max_call_seconds

    async def forward(
        self,
        client: UpstreamClient,
        tool: Tool,
        method: str,
        params: dict[str, str],
        query: str,
        arguments: dict[str, Any],
        request_headers: Mapping[str, str],
        body: bytes,
        request_id: str,
        max_bytes: int,
        user: Credentials | None = None,
        stream: bool = False,
    ) -> UpstreamResponse:
        """``user``: the end user's credential (``gateway.upstream.user_auth``), sent instead of the
        upstream's own and redacted from its answer like it. ``stream`` (a ``stream: true`` REST
        tool): a good answer comes back as a ``StreamedResponse`` as soon as its headers are in."""
        route = self._routes[tool.name]
        if user is not None:
            route = _Route(route.tool, user, route.soap, route.rules)
        if route.soap is not None:
            return await self._soap(client, route, arguments, request_headers, request_id, max_bytes)
        return await self._rest(client, route, method, params, query, arguments, request_headers, body, request_id,
                                max_bytes, stream)

    # -- REST --

    async def _rest(
        self, client: UpstreamClient, route: _Route, method: str, params: dict[str, str], query: str, arguments: dict[str, Any],
        request_headers: Mapping[str, str], body: bytes, request_id: str, max_bytes: int, stream: bool = False,
    ) -> UpstreamResponse:
        tool, mapping = route.tool, route.tool.request
        headers = {name: request_headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request_headers}
        if mapping is not None and mapping.query is not None:
            pairs: list[tuple[str, str]] = []
            for name, argument in mapping.query.items():
                value = arguments.get(argument)
                for item in value if isinstance(value, list) else [value]:
                    if item is not None:
                        pairs.append((name, _text(item)))
            query = urlencode(pairs)
        if mapping is not None and mapping.headers is not None:
            for name, argument in mapping.headers.items():
                if arguments.get(argument) is not None:
                    value = _text(arguments[argument])
                    if _HEADER_FORBIDDEN.search(value):  # refused at argument time; never a 500 here
                        raise GatewayError(
                            codes.INVALID_ARGUMENTS, f"argument {argument!r} cannot go into the header {name}",
                            status=422, retryable=False, fields=[{"field": argument}],
                        )
                    headers[name] = value
        if mapping is not None and mapping.body is not None:
            document: dict[str, Any] = {}
            for name, argument in mapping.body.items():
                if argument in arguments:
                    _set_pointer(document, name if name.startswith("/") else "/" + name.replace("~", "~0").replace("/", "~1"), arguments[argument])
            body = _dumps(document)
            headers[lower(CONTENT_TYPE)] = "application/json"
        elif method in BODY_METHODS:
            # The arguments that came in the JSON body (neither path nor query), as validated.
            taken = set(params) | {name for name, _ in parse_qsl(query, keep_blank_values=True)}
            body = _dumps({name: value for name, value in arguments.items() if name not in taken})
            headers[lower(CONTENT_TYPE)] = "application/json"
        else:
            body = b""  # GET, HEAD and DELETE carry no body (the challenge stage refused one)
        headers.update(route.credentials.headers)
        headers[lower(REQUEST_ID)] = request_id
        upstream_method = "HEAD" if method == "HEAD" else method
        response = await self._exchange(client, route, upstream_method, upstream_target(tool, params, query), headers, body,
                                        max_bytes, stream)
        credentials = route.credentials
        _refuse_redirect(response)
        response = _strip_headers(response)
        if response.status >= 400:
            return self._rest_error(response, credentials, route.tool.settle)
        if credentials.secrets:
            response = replace(response, headers=credentials.redact_headers(response.headers))
        if isinstance(response, StreamedResponse):
            return redacted_stream(response, credentials) if credentials.secrets else response
        if route.rules:
            check_rules(route.rules, tool.name, credentials, response, _json_or_none(response.body), None)
        if credentials.secrets:
            response = UpstreamResponse(response.status, response.headers, credentials.redact_bytes(response.body))
        return response

    def _rest_error(self, response: UpstreamResponse, credentials: Credentials, settle: str) -> UpstreamResponse:
        status = response.status
        upstream_code, message = _upstream_message(response.body, credentials)
        code = "upstream_rate_limited" if status == 429 else "upstream_client_error" if status < 500 else "upstream_error"
        charge = "nothing was charged" if settle == "after" else "settled before the call: X402GW-Refund says if it is refunded"
        return error_response(
            code, message or f"the upstream answered HTTP {status}; {charge}", status,
            retryable=status in RETRYABLE_STATUS, upstream_status=status,
            retry_after=retry_after_seconds(response.header(lower(RETRY_AFTER))), upstreamError=upstream_code,
        )

    # -- SOAP --

    async def _soap(
        self, client: UpstreamClient, route: _Route, arguments: dict[str, Any], request_headers: Mapping[str, str], request_id: str, max_bytes: int
    ) -> UpstreamResponse:
        tool, builder = route.tool, route.soap
        assert builder is not None and tool.soap is not None
        try:
            envelope = builder.build(arguments)
        except SoapArgumentError as exc:
            raise GatewayError(codes.INVALID_ARGUMENTS, str(exc), status=422, retryable=False) from None
        headers = soap_content_type(builder.version, builder.action)
        headers[lower(ACCEPT)] = "application/soap+xml, text/xml" if builder.version == "1.2" else "text/xml"
        headers.update(route.credentials.headers)
        headers[lower(REQUEST_ID)] = request_id
        response = await self._exchange(client, route, "POST", tool.soap.endpoint, headers, envelope, max_bytes)
        _refuse_redirect(response)
        if response.status == 429:  # too many requests, fault envelope or not: the breaker backs off for it
            return self._rest_error(response, route.credentials, route.tool.settle)
        return await asyncio.to_thread(self._soap_answer, route, response)  # off the loop: 10 MB takes seconds

    def _soap_answer(self, route: _Route, response: UpstreamResponse) -> UpstreamResponse:
        tool, credentials = route.tool, route.credentials
        assert tool.soap is not None
        root = parse_xml(response.body)
        fault = find_fault(root) if root is not None else None
        if fault is not None:
            raise UpstreamFailure(
                codes.UPSTREAM_FAULT, credentials.redact(fault.message)[:_MESSAGE_LIMIT], status=502,
                retryable=fault.retryable, upstreamStatus=response.status, faultCode=fault.code,
            )
        if response.status >= 400:
            return self._rest_error(response, credentials, route.tool.settle)
        if route.rules and root is not None:
            # before: an <Error> may replace the result
            check_rules(route.rules, tool.name, credentials, response, None, root, xpath_only=True)
        result = find_result(root, tool.soap.result) if root is not None else None
        if result is None:
            raise UpstreamFailure(
                codes.UPSTREAM_INVALID_RESPONSE, "the upstream's answer is not the SOAP response this tool expects",
                status=502, retryable=False, upstreamStatus=response.status,
            )
        document = element_to_json(result, tool.output_schema)
        if route.rules:
            check_rules(route.rules, tool.name, credentials, response, document, None, pointer_only=True)
        body = credentials.redact_bytes(_dumps(document)) if credentials.secrets else _dumps(document)
        return UpstreamResponse(response.status, [(lower(CONTENT_TYPE), "application/json")], body)

    # -- retries and failover --

    def _retryable_call(self, route: _Route, method: str) -> bool:
        tool = route.tool
        if tool.retry is not None:
            return tool.retry
        return tool.kind == "rest" and method in IDEMPOTENT_METHODS

    def _retry_status(self, route: _Route, policy: RetryPolicy, response: UpstreamResponse) -> bool:
        if response.status not in policy.on_status:
            return False
        if route.soap is not None and response.status == 500:
            root = parse_xml(response.body)
            fault = find_fault(root) if root is not None else None
            return fault is None or fault.retryable  # a Client/Sender fault fails the same way again
        return True

    async def _exchange(
        self, client: UpstreamClient, route: _Route, method: str, target: str, headers: dict[str, str], body: bytes,
        max_bytes: int, stream: bool = False,
    ) -> UpstreamResponse:
        upstream = route.tool.upstream
        policy = upstream.retry
        bases = (upstream.base_url, *upstream.failover)
        retryable = self._retryable_call(route, method)
        # A retryable call tries each base URL at least once before giving up.
        attempts = max(policy.attempts, len(bases)) if retryable else 1
        attempt, index = 1, 0
        while True:
            base = bases[index]
            try:
                call = client.open if stream else client.send
                response = await call(method, base + target, headers, body, upstream.timeout_seconds, max_bytes)
            except UpstreamUnreachable:
                # Nothing was sent: the next base URL is safe for any call, retryable or not.
                if index + 1 < len(bases):
                    log.warning("upstream %s: %s unreachable, failing over to %s", upstream.name, base, bases[index + 1])
                    index += 1
                    continue
                if attempt >= attempts:
                    raise
                attempt, index = attempt + 1, 0
                await self.sleep(backoff_seconds(policy, attempt - 1, self.draw))
                continue
            except GatewayError as err:
                if err.code == "upstream_response_too_large" or attempt >= attempts:
                    raise
                log.warning("upstream %s: %s at %s (attempt %d of %d)", upstream.name, err.code, base, attempt, attempts)
                attempt, index = attempt + 1, (index + 1) % len(bases)
                await self.sleep(backoff_seconds(policy, attempt - 1, self.draw))
                continue
            if attempt >= attempts or not self._retry_status(route, policy, response):
                return response
            delay = retry_after_seconds(response.header(lower(RETRY_AFTER)))
            if delay is not None and delay > policy.max_retry_after_seconds:
                log.info("upstream %s: Retry-After %.0fs exceeds the cap; answering now", upstream.name, delay)
                return response
            if delay is None:
                delay = backoff_seconds(policy, attempt, self.draw)
            if response.status != 429:
                index = (index + 1) % len(bases)  # a failing server: let the next one try
            log.warning(
                "upstream %s: HTTP %d from %s, retry %d of %d in %.2fs",
                upstream.name, response.status, base, attempt, attempts - 1, delay,
            )
            attempt += 1
            await self.sleep(delay)


def redacted_stream(response: StreamedResponse, credentials: Credentials) -> StreamedResponse:
    """A stream with the upstream's credentials redacted, across chunk boundaries too: the last
    ``longest secret - 1`` bytes of each chunk wait for the next one (or the end)."""
    keep = max(len(secret.encode()) for secret in credentials.forms) - 1

    async def chunks() -> AsyncIterator[bytes]:
        tail = b""
        async for chunk in response.chunks:
            data = credentials.redact_bytes(tail + chunk)
            cut = max(len(data) - keep, 0)
            tail = data[cut:]
            if cut:
                yield data[:cut]
        if tail:
            yield credentials.redact_bytes(tail)

    return replace(response, chunks=chunks())
