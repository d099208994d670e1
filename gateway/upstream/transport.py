"""The upstream seam: ``UpstreamClient`` (one pooled ``aiohttp`` session by default), its answer, and
which headers may cross it. URLs come only from the catalog; redirects are never followed; bodies
are read up to a limit; connection errors become refusals here and never leak.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import (
    ACCEPT,
    ACCEPT_LANGUAGE,
    CACHE_CONTROL,
    PAYMENT_HEADERS,
    REQUEST_ID,
    USER_AGENT,
    X402GW_PREFIX,
    lower,
)

__all__ = [
    "DROPPED_RESPONSE_HEADERS",
    "DROPPED_RESPONSE_PREFIXES",
    "FORWARDED_REQUEST_HEADERS",
    "AiohttpUpstreamClient",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "forwarded_response_header",
    "strip_headers",
    "wire_value",
]

# Request headers an agent may pass to an upstream; everything else (cookies, authorization,
# payment headers, hop-by-hop, forwarding headers) stays at the gateway.
# The body's Content-Type is the gateway's own (the body is built from the arguments).
FORWARDED_REQUEST_HEADERS = tuple(lower(name) for name in (ACCEPT, ACCEPT_LANGUAGE, USER_AGENT))
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


_UNWRITABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters a server refuses to write


def _received(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """An upstream's header fields as the octets it sent, one character a byte (Latin-1, as
    Starlette writes them back): a UTF-8 file name or any obs-text reaches the agent unchanged.
    aiohttp's own view decodes UTF-8, which Starlette cannot encode: a paid answer was a 500. A field
    whose value holds a control character (DEL, VT...) is dropped: the server would refuse to write it."""
    search = _UNWRITABLE.search
    return [(name.decode("latin-1"), text) for name, value in raw if not search(text := value.decode("latin-1"))]


def wire_value(value: str) -> str | None:
    """A header value Starlette can write: Latin-1 as it is, else its UTF-8 octets one character a
    byte (answers stored before ``_received``); None: it cannot be written (a control character)."""
    if _UNWRITABLE.search(value):
        return None
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    return value


def strip_headers(response: UpstreamResponse) -> UpstreamResponse:
    headers = [(k, v) for k, v in response.headers if forwarded_response_header(k)]
    return response if len(headers) == len(response.headers) else replace(response, headers=headers)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True, slots=True)
class StreamedResponse(UpstreamResponse):
    """A good (2xx) answer still arriving: ``body`` is empty, ``chunks`` yields the body as the
    upstream sends it (raising ``GatewayError`` ``upstream_stream_broken`` or ``upstream_timeout``
    when it stops midway), ``close`` drops the connection. Error answers are never streamed."""

    chunks: AsyncIterator[bytes]
    close: Callable[[], None]


class UpstreamClient(Protocol):
    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse: ...

    async def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse: ...  # a 2xx as a StreamedResponse (``stream: true`` tools)

    async def close(self) -> None: ...


class UpstreamUnreachable(GatewayError):
    """No connection could be made: the request was never sent, so another base URL is safe."""


def _failure(exc: TimeoutError | aiohttp.ClientError) -> GatewayError:
    """What a failed exchange with the upstream is (before any answer): nothing was charged."""
    if isinstance(exc, TimeoutError):
        return GatewayError(codes.UPSTREAM_TIMEOUT, "the upstream did not answer in time; nothing was charged",
                            retryAfter=1, retryable=True)
    if isinstance(exc, aiohttp.ClientConnectorError):  # never connected: another base URL is safe
        return UpstreamUnreachable(codes.UPSTREAM_UNAVAILABLE, "the upstream could not be reached; nothing was charged",
                                   retryAfter=1, retryable=True)
    return GatewayError(codes.UPSTREAM_UNAVAILABLE, "the upstream connection failed; nothing was charged",
                        retryAfter=1, retryable=True)


class AiohttpUpstreamClient:
    def __init__(self, *, max_connections: int = 256) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._max_connections = max_connections
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}  # by seconds: a tool's, so a handful

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            if len(self._timeouts) >= 64:  # bounded, whatever callers pass
                self._timeouts.clear()
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            # No cookie jar: this one session carries every payer's calls, so a cookie an upstream
            # set on one call (a session, a user's) would go back on everyone's next calls.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
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
                timeout=self._timeout(timeout),
            ) as response:
                if response.content_length is not None and response.content_length > max_bytes:
                    raise GatewayError(codes.UPSTREAM_RESPONSE_TOO_LARGE, "the upstream answer exceeds the size limit")
                data = await _read_whole(response.content, max_bytes)
                if len(data) > max_bytes:
                    raise GatewayError(codes.UPSTREAM_RESPONSE_TOO_LARGE, "the upstream answer exceeds the size limit")
                return UpstreamResponse(response.status, _received(response.raw_headers), data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None

    async def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse:
        """Like ``send``, but a 2xx answer comes back as soon as its headers are in, as a
        ``StreamedResponse``: ``timeout`` bounds the connection and each wait for more of the body,
        not the whole stream. Other answers are read whole (at most ``max_bytes``), as ``send`` does."""
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        try:
            response = await self._client().request(
                method, url, headers=headers, data=body or None, allow_redirects=False, timeout=limits,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None
        headers_out = _received(response.raw_headers)
        if response.status >= 300:
            try:
                data = await _read_whole(response.content, max_bytes)
            except (TimeoutError, aiohttp.ClientError):
                data = b""
            finally:
                response.release()
            return UpstreamResponse(response.status, headers_out, data[: max_bytes])
        return StreamedResponse(response.status, headers_out, b"", _chunks(response), response.close)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _read_whole(content: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """The whole body, or the first ``max_bytes`` + 1 bytes of one that is larger. ``read(n)`` hands
    back what has arrived so far, up to ``n``: read once, an answer sent in two parts was served (and
    charged) cut short. A body that ends before its Content-Length raises (aiohttp's payload error)."""
    parts: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = await content.read(max_bytes + 1 - size)
        if not chunk:  # the end of the body
            break
        parts.append(chunk)
        size += len(chunk)
        if content.at_eof():  # mostly: the whole body came in one go, no second read
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body of a streamed answer as it arrives; a broken or stalled upstream is a GatewayError."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except TimeoutError:
        raise GatewayError(codes.UPSTREAM_TIMEOUT, "the upstream stopped sending mid-stream", retryable=False) from None
    except aiohttp.ClientError:
        received = _unread(response.content)
        if received:
            yield received  # what the upstream sent before it broke off is relayed (and charged) too
        raise GatewayError("upstream_stream_broken", "the upstream's stream broke off midway", status=502,
                           retryable=False) from None
    finally:
        response.release()


def _unread(content: aiohttp.StreamReader) -> bytes:
    """The bytes that arrived before the connection broke and were not read yet. aiohttp's readers
    raise the connection's error before handing out what is buffered (``StreamReader.readany``), so
    an upstream that sends its last events and breaks off in one go would lose them; its own
    non-raising read takes them (private, hence looked up: nothing if a later aiohttp lacks it)."""
    read_nowait = getattr(content, "_read_nowait", None)
    if read_nowait is None:
        return b""
    try:
        data = read_nowait(-1)
    except Exception:  # noqa: BLE001 - a reader in a state we do not know: nothing is salvaged
        return b""
    return bytes(data) if isinstance(data, (bytes, bytearray)) else b""
