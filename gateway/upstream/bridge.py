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
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
from lxml import etree

from catalog import Tool
from catalog.bridge import FailureRule, RetryPolicy
from gateway.upstream.credentials import Credentials, CredentialsError, resolve_credentials
from gateway import codes
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import (
    ACCEPT,
    ACCEPT_LANGUAGE,
    CACHE_CONTROL,
    CONTENT_TYPE,
    PAYMENT_HEADERS,
    REQUEST_ID,
    RETRY_AFTER,
    USER_AGENT,
    X402GW_PREFIX,
    lower,
)
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

log = logging.getLogger("x402gw.bridge")

# Request headers an agent may pass to an upstream; everything else (cookies, authorization,
# payment headers, hop-by-hop, forwarding headers) stays at the gateway.
# The body's Content-Type is the gateway's own (the body is built from the arguments).
FORWARDED_REQUEST_HEADERS = tuple(lower(name) for name in (ACCEPT, ACCEPT_LANGUAGE, USER_AGENT))
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Characters an upstream header value cannot hold (HTTP clients refuse CR and LF with an exception).
_HEADER_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# Response headers that describe the connection, not the content, or that we set ourselves: an
# upstream must not be able to forge a receipt, an offer or a gateway header in the agent's answer.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "content-encoding", "server", "date",
        "set-cookie", "set-cookie2",
        *(lower(name) for name in (*PAYMENT_HEADERS, CACHE_CONTROL, REQUEST_ID)),
    }
)
# Every header of the gateway's own (X402GW-Replay, X402GW-Refund, ...) is dropped too.
DROPPED_RESPONSE_PREFIXES = (lower(X402GW_PREFIX),)


def forwarded_response_header(name: str) -> bool:
    """Whether an upstream response header may reach the agent."""
    lowered = name.lower()
    return lowered not in DROPPED_RESPONSE_HEADERS and not lowered.startswith(DROPPED_RESPONSE_PREFIXES)


def _strip_headers(response: UpstreamResponse) -> UpstreamResponse:
    headers = [(k, v) for k, v in response.headers if forwarded_response_header(k)]
    return response if len(headers) == len(response.headers) else UpstreamResponse(response.status, headers, response.body)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_MESSAGE_LIMIT = 300


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class UpstreamClient(Protocol):
    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class UpstreamUnreachable(GatewayError):
    """No connection could be made: the request was never sent, so another base URL is safe."""


class UpstreamFailure(GatewayError):
    """The upstream answered, and the answer is a failure (SOAP fault, catalog failure rule)."""


class BridgeConfigError(GatewayConfigError):
    """A tool's upstream cannot be prepared (credentials, WSDL, failure rules): the gateway does not start."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


class AiohttpUpstreamClient:
    def __init__(self, *, max_connections: int = 256) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._max_connections = max_connections

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False)
        return self._session

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        try:
            async with self._client().request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                if response.content_length is not None and response.content_length > max_bytes:
                    raise GatewayError(codes.UPSTREAM_RESPONSE_TOO_LARGE, "the upstream answer exceeds the size limit")
                data = await response.content.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise GatewayError(codes.UPSTREAM_RESPONSE_TOO_LARGE, "the upstream answer exceeds the size limit")
                return UpstreamResponse(response.status, list(response.headers.items()), data)
        except TimeoutError:
            raise GatewayError(
                codes.UPSTREAM_TIMEOUT, "the upstream did not answer in time; nothing was charged", retryAfter=1, retryable=True
            ) from None
        except aiohttp.ClientConnectorError:
            raise UpstreamUnreachable(
                codes.UPSTREAM_UNAVAILABLE, "the upstream could not be reached; nothing was charged", retryAfter=1, retryable=True
            ) from None
        except aiohttp.ClientError:
            raise GatewayError(
                codes.UPSTREAM_UNAVAILABLE, "the upstream connection failed; nothing was charged", retryAfter=1, retryable=True
            ) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def upstream_url(tool: Tool, params: dict[str, str], query: str) -> str:
    return tool.upstream.base_url + upstream_target(tool, params, query)


def upstream_target(tool: Tool, params: dict[str, str], query: str) -> str:
    path = tool.upstream_path
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return f"{path}?{query}" if query else path


# -- small pure helpers --------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    """Compact JSON. Decimals (request bodies are parsed with them) are written with their own
    digits, never rounded through a binary float: each goes out as a tagged string, swapped for
    its digits afterwards (the tag is random per call, so no string of the caller's can match)."""
    numbers: list[str] = []
    tag = secrets.token_hex(8)

    def default(item: Any) -> Any:
        if isinstance(item, Decimal):
            if not item.is_finite():
                raise ValueError("a JSON number must be finite")
            numbers.append(str(item))  # always a valid JSON number: 1.50, -0, 1E+2, 5E-7
            return f"{tag}:{len(numbers) - 1}"
        raise TypeError(type(item).__name__)

    text = json.dumps(value, separators=(",", ":"), default=default, allow_nan=False)
    if numbers:
        text = re.sub(f'"{tag}:([0-9]+)"', lambda match: numbers[int(match.group(1))], text)
    return text.encode()


def _refuse_redirect(response: UpstreamResponse) -> None:
    """A 3xx is not the content paid for, and is never followed: nothing of it (body, Location)
    reaches the agent, and nothing is charged."""
    if 300 <= response.status < 400:
        raise UpstreamFailure(
            codes.UPSTREAM_REDIRECT, "the upstream answered with a redirect, which is not followed; nothing was charged",
            status=502, retryable=False, upstreamStatus=response.status,
        )


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _pointer_parts(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


_MISSING = object()


def resolve_pointer(document: Any, pointer: str) -> Any:
    node = document
    for part in _pointer_parts(pointer):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _set_pointer(document: dict[str, Any], pointer: str, value: Any) -> None:
    parts = _pointer_parts(pointer)
    node = document
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_seconds(policy: RetryPolicy, retry: int, draw: Callable[[], float]) -> float:
    """Exponential with "equal jitter": half the step is fixed, half random, so retries of many
    requests do not arrive together yet never come back at once."""
    step = float(min(policy.max_backoff_seconds, policy.backoff_seconds * (2 ** (retry - 1))))
    return step / 2 + draw() * step / 2


def _upstream_message(body: bytes, credentials: Credentials) -> tuple[str | None, str | None]:
    """(code, message) the upstream gave in a JSON error body, if any; redacted and cut short."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    code = message = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        elif isinstance(error, str):
            code = error
        message = message or data.get("message") or data.get("detail")

    def clean(value: Any) -> str | None:
        return credentials.redact(str(value))[:_MESSAGE_LIMIT] if isinstance(value, (str, int)) else None

    return clean(code), clean(message)


def error_response(
    code: str, message: str, status: int, *, retryable: bool, upstream_status: int | None,
    retry_after: float | None = None, **fields: Any,
) -> UpstreamResponse:
    body: dict[str, Any] = {"error": code, "message": message, "retryable": retryable, "upstreamStatus": upstream_status}
    headers = [(lower(CONTENT_TYPE), "application/json")]
    if retry_after is not None:
        body["retryAfter"] = int(retry_after + 0.999)
        headers.append((lower(RETRY_AFTER), str(body["retryAfter"])))
    body.update({k: v for k, v in fields.items() if v is not None})
    return UpstreamResponse(status, headers, _dumps(body))


# -- compiled per tool ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _CompiledRule:
    rule: FailureRule
    xpath: etree.XPath | None


@dataclass(frozen=True)
class _Route:
    tool: Tool
    credentials: Credentials
    soap: SoapRequestBuilder | None
    rules: tuple[_CompiledRule, ...]


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
            rules: list[_CompiledRule] = []
            for rule in tool.failure_when:
                try:
                    xpath = etree.XPath(rule.xpath, smart_strings=False) if rule.xpath else None
                except etree.XPathSyntaxError:
                    raise BridgeConfigError(f"tool {tool.name}: failure rule xpath {rule.xpath!r} is invalid", "invalid_xpath") from None
                rules.append(_CompiledRule(rule, xpath))
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
    ) -> UpstreamResponse:
        route = self._routes[tool.name]
        if route.soap is not None:
            return await self._soap(client, route, arguments, request_headers, request_id, max_bytes)
        return await self._rest(client, route, method, params, query, arguments, request_headers, body, request_id, max_bytes)

    # -- REST --

    async def _rest(
        self, client: UpstreamClient, route: _Route, method: str, params: dict[str, str], query: str, arguments: dict[str, Any],
        request_headers: Mapping[str, str], body: bytes, request_id: str, max_bytes: int,
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
        response = await self._exchange(client, route, upstream_method, upstream_target(tool, params, query), headers, body, max_bytes)
        credentials = route.credentials
        _refuse_redirect(response)
        response = _strip_headers(response)
        if response.status >= 400:
            return self._rest_error(response, credentials)
        if route.rules:
            self._check_rules(route, response, _json_or_none(response.body), None)
        if credentials.secrets:
            response = UpstreamResponse(response.status, response.headers, credentials.redact_bytes(response.body))
        return response

    def _rest_error(self, response: UpstreamResponse, credentials: Credentials) -> UpstreamResponse:
        status = response.status
        upstream_code, message = _upstream_message(response.body, credentials)
        code = "upstream_rate_limited" if status == 429 else "upstream_client_error" if status < 500 else "upstream_error"
        return error_response(
            code, message or f"the upstream answered HTTP {status}; nothing was charged", status,
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
        credentials = route.credentials
        _refuse_redirect(response)
        root = parse_xml(response.body)
        fault = find_fault(root) if root is not None else None
        if fault is not None:
            raise UpstreamFailure(
                codes.UPSTREAM_FAULT, credentials.redact(fault.message)[:_MESSAGE_LIMIT], status=502,
                retryable=fault.retryable, upstreamStatus=response.status, faultCode=fault.code,
            )
        if response.status >= 400:
            return self._rest_error(response, credentials)
        if route.rules and root is not None:
            self._check_rules(route, response, None, root, xpath_only=True)  # before: an <Error> may replace the result
        result = find_result(root, tool.soap.result) if root is not None else None
        if result is None:
            raise UpstreamFailure(
                codes.UPSTREAM_INVALID_RESPONSE, "the upstream's answer is not the SOAP response this tool expects",
                status=502, retryable=False, upstreamStatus=response.status,
            )
        document = element_to_json(result, tool.output_schema)
        if route.rules:
            self._check_rules(route, response, document, None, pointer_only=True)
        body = credentials.redact_bytes(_dumps(document)) if credentials.secrets else _dumps(document)
        return UpstreamResponse(response.status, [(lower(CONTENT_TYPE), "application/json")], body)

    # -- failure rules --

    def _check_rules(
        self, route: _Route, response: UpstreamResponse, document: Any, root: Any,
        *, xpath_only: bool = False, pointer_only: bool = False,
    ) -> None:
        for compiled in route.rules:
            rule = compiled.rule
            if (xpath_only and compiled.xpath is None) or (pointer_only and compiled.xpath is not None):
                continue
            if compiled.xpath is not None:
                tree = root if root is not None else parse_xml(response.body)
                if tree is None:
                    continue
                found = compiled.xpath(tree)
                value = _xpath_value(found)
                matched = (value == _text(rule.equals)) if rule.has_equals else bool(found)
                detail = value
            else:
                if document is None:
                    continue
                value = resolve_pointer(document, rule.pointer or "")
                matched = (value is not _MISSING and value == rule.equals) if rule.has_equals else value is not _MISSING
                detail = None
            if not matched:
                continue
            message = rule.message
            if message is None and rule.message_pointer is not None and document is not None:
                found_message = resolve_pointer(document, rule.message_pointer)
                message = None if found_message is _MISSING else str(found_message)
            message = message or (detail if isinstance(detail, str) and detail else None)
            message = route.credentials.redact(message or "the upstream reported a failure")[:_MESSAGE_LIMIT]
            log.info("tool %s: answer matched failure rule %s (HTTP %s)", route.tool.name, rule.code, response.status)
            raise UpstreamFailure(rule.code, message, status=rule.status, retryable=rule.retryable, upstreamStatus=response.status)

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
        self, client: UpstreamClient, route: _Route, method: str, target: str, headers: dict[str, str], body: bytes, max_bytes: int
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
                response = await client.send(method, base + target, headers, body, upstream.timeout_seconds, max_bytes)
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


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _xpath_value(found: Any) -> str | None:
    if isinstance(found, list):
        if not found:
            return None
        first = found[0]
        if isinstance(first, etree._Element):
            return " ".join("".join(first.itertext()).split())
        return str(first)
    if isinstance(found, bool):
        return "true" if found else "false"
    return None if found is None else str(found)
