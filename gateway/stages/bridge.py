"""Stage 5, bridge: the only stage that calls an upstream.

``UpstreamClient`` is the seam: the default implementation is one pooled ``aiohttp`` session
(several times cheaper per request than httpx's own transport on this path). URLs come only from
the catalog; redirects are never followed; hop-by-hop and payment headers never cross.
Stops with 502 (unreachable, too large) or 504 (timeout); an upstream status ≥ 400 is returned,
not raised: the settle stage decides what it means.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import aiohttp

from catalog import Tool
from gateway.errors import GatewayError

# Request headers an agent may pass to an upstream; everything else (cookies, authorization,
# payment headers, hop-by-hop, forwarding headers) stays at the gateway.
FORWARDED_REQUEST_HEADERS = ("accept", "accept-language", "content-type", "user-agent")
# Response headers that describe the connection, not the content, or that we set ourselves.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "content-encoding", "server", "date",
        "set-cookie", "payment-required", "payment-response", "x-payment-response", "cache-control",
    }
)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class UpstreamClient(Protocol):
    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float, max_bytes: int
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


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
                    raise GatewayError("upstream_response_too_large", "the upstream answer exceeds the size limit")
                data = await response.content.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise GatewayError("upstream_response_too_large", "the upstream answer exceeds the size limit")
                return UpstreamResponse(response.status, list(response.headers.items()), data)
        except asyncio.TimeoutError:
            raise GatewayError("upstream_timeout", "the upstream did not answer in time; nothing was charged", retryAfter=1) from None
        except aiohttp.ClientError:
            raise GatewayError("upstream_unavailable", "the upstream could not be reached; nothing was charged", retryAfter=1) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def upstream_url(tool: Tool, params: dict[str, str], query: str) -> str:
    path = tool.upstream_path
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    url = tool.upstream.base_url + path
    return f"{url}?{query}" if query else url


async def forward(
    client: UpstreamClient,
    tool: Tool,
    method: str,
    params: dict[str, str],
    query: str,
    request_headers: dict[str, str],
    body: bytes,
    request_id: str,
    max_bytes: int,
) -> UpstreamResponse:
    headers = {name: request_headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request_headers}
    headers["x-request-id"] = request_id
    return await client.send(method, upstream_url(tool, params, query), headers, body, tool.upstream.timeout_seconds, max_bytes)
