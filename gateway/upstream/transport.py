"""The upstream seam: ``UpstreamClient`` (one pooled ``aiohttp`` session by default), its answer, and
which headers may cross it. URLs come only from the catalog; redirects are never followed; bodies
are read up to a limit; connection errors become refusals here and never leak.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def strip_headers(response: UpstreamResponse) -> UpstreamResponse:
    headers = [(k, v) for k, v in response.headers if forwarded_response_header(k)]
    return response if len(headers) == len(response.headers) else UpstreamResponse(response.status, headers, response.body)


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
