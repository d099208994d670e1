"""JSON-RPC over one pooled aiohttp session, with call coalescing.

Calls made while a JSON-RPC request is in flight are coalesced into one JSON-RPC *batch* (one HTTP
round trip for every read, broadcast and receipt poll waiting at that moment). A node spends far
less per call on a batch than on as many concurrent requests (``bench/results.txt``). Broadcasts
have a lane of their own, sent in nonce order. Transport errors become ``ChainUnavailable``; a
JSON-RPC error answer becomes ``RpcError``.

Several RPC URLs per network fail over: each HTTP request goes to the first URL that is not known
to be down, then the next, until one answers (a down URL is tried last until
``RPC_DOWN_SECONDS`` have passed, then first again). Every call may be repeated at another node:
reads, and broadcasts of one signed transaction, which has one hash and can be mined only once
(the broadcast lane already treats "already known" and its own nonce as sent). A URL fails on a
transport error, a timeout, HTTP 429, or a 5xx without a JSON answer; a JSON-RPC error answer
(a revert, a nonce error) is the node's answer, not a failure. ``rpc_health()`` tells each URL's
state, redacted (``redact_url``: scheme and host; paths often carry an API key).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic_core import to_json

from settlement.errors import ChainUnavailable

__all__ = [
    "MAX_BATCHES_IN_FLIGHT",
    "MAX_BATCH_CALLS",
    "RPC_DOWN_SECONDS",
    "SEND_LANE",
    "JsonRpcTransport",
    "RpcError",
    "RpcUrlHealth",
    "redact_url",
    "rpc_url_list",
]

log = logging.getLogger("x402gw.chain")

# JSON-RPC coalescing: at most this many calls per batch, this many batches in flight at once per
# lane. Broadcasts have a lane of their own: a node may take a while over a batch of them (anvil
# mines a block per transaction before it answers), and reads and receipt polls must not queue
# behind that.
MAX_BATCH_CALLS = 100
MAX_BATCHES_IN_FLIGHT = 2
SEND_LANE = "eth_sendRawTransaction"
# A URL that failed is tried after the others for this long.
RPC_DOWN_SECONDS = 30.0


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what may be logged or shown. RPC and facilitator URLs
    often carry an API key in their path or query, a password in their user info."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    return f"{parts.scheme}://{host}{port}" if host else "<url>"


def rpc_url_list(rpc_url: str | Sequence[str]) -> list[str]:
    """One URL or several, in order of preference, as a non-empty list. A string may hold several
    separated by spaces (as the settings keep them): a URL never holds a raw space."""
    urls = rpc_url.split() if isinstance(rpc_url, str) else [str(u) for u in rpc_url]
    if not urls or not all(urls):
        raise ValueError("at least one RPC URL is needed")
    return urls


@dataclass
class RpcUrlHealth:
    """One RPC URL's state: ``unknown`` until used, ``up`` after an answer, ``down`` after a failure."""

    status: str = "unknown"
    failures: int = 0  # consecutive
    last_error: str | None = None
    down_until: float = 0.0


class _UnusableStatus(Exception):
    """An HTTP status that means "this node cannot serve now" (429, or a 5xx without JSON)."""


class JsonRpcTransport:
    """The transport part of ``JsonRpcChain`` (whose ``__init__`` sets this state): ``_rpc`` is every
    other part's way to the node."""

    rpc_url: str  # the first (preferred) URL
    rpc_urls: list[str]
    _rpc_health: dict[str, RpcUrlHealth]
    _clock: Callable[[], float]
    _request_timeout: float
    _session: aiohttp.ClientSession | None
    _session_loop: asyncio.AbstractEventLoop | None
    _request_id: int
    _waiting: dict[bool, list[tuple[dict[str, Any], asyncio.Future[Any]]]]
    _in_flight: dict[bool, int]
    _send_order: dict[int, int]
    _batching: bool
    _tasks: set[asyncio.Task[None]]

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._request_timeout), trust_env=False,
                headers={"Content-Type": "application/json"},  # every request's, set once
            )
            self._session_loop = loop
        return self._session

    async def _rpc(self, method: str, params: list[Any], *, order: int | None = None) -> Any:
        """One JSON-RPC call, sent alone or in a batch with the calls made while others are in flight."""
        loop = asyncio.get_running_loop()
        self._request_id += 1
        future: asyncio.Future[Any] = loop.create_future()
        lane = method == SEND_LANE
        if order is not None:
            self._send_order[self._request_id] = order  # broadcasts go out in nonce order
        self._waiting[lane].append(({"jsonrpc": "2.0", "id": self._request_id, "method": method, "params": params}, future))
        # One batch of broadcasts in flight at a time (they reach the node in order); reads two.
        if self._in_flight[lane] < (1 if lane else MAX_BATCHES_IN_FLIGHT):
            self._in_flight[lane] += 1  # counted now: a second flusher must not start before this one runs
            self._spawn(self._flush(lane))
        # The HTTP request belongs to the flusher: a caller cancelled here does not un-send a broadcast.
        return await future

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, lane: bool) -> None:
        try:
            waiting = self._waiting[lane]
            while waiting:
                if lane and self._send_order:
                    waiting.sort(key=lambda item: self._send_order.get(item[0]["id"], -1))
                calls = waiting[:MAX_BATCH_CALLS]
                del waiting[:MAX_BATCH_CALLS]
                for call, _ in calls:
                    self._send_order.pop(call["id"], None)
                await self._post(calls)
        finally:
            self._in_flight[lane] -= 1

    async def _post(self, calls: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        """Send ``calls`` (a batch when there are several) and settle each caller's future."""
        methods = sorted({call["method"] for call, _ in calls})
        try:
            if len(calls) == 1 or not self._batching:
                answers = [await self._http(call) for call, _ in calls]
            else:
                answer = await self._http([call for call, _ in calls])
                if not isinstance(answer, list):
                    # A node without batch support answers one error object: ask one by one from now on.
                    self._batching = False
                    answers = [await self._http(call) for call, _ in calls]
                else:
                    answers = answer
        except asyncio.CancelledError:
            for _, future in calls:
                if not future.done():
                    future.set_exception(ChainUnavailable(f"chain RPC {methods[0]} failed: cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, timeouts, aiohttp errors, a body that is not JSON: infrastructure
            for call, future in calls:
                if not future.done():
                    future.set_exception(self._unavailable(call["method"], exc))
            return
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        for call, future in calls:
            if future.done():
                continue
            response = by_id.get(call["id"])
            if response is None:
                future.set_exception(ChainUnavailable(f"chain RPC {call['method']} failed: not a JSON-RPC answer"))
            elif "error" in response:
                error = response["error"]
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                future.set_exception(RpcError(call["method"], message))
            else:
                future.set_result(response.get("result"))

    @staticmethod
    def _unavailable(method: str, exc: BaseException) -> ChainUnavailable:
        error = ChainUnavailable(f"chain RPC {method} failed: {type(exc).__name__}")
        error.__cause__ = exc
        return error

    def rpc_health(self) -> list[dict[str, Any]]:
        """Each RPC URL, in configured order: ``{"url" (redacted), "state", "failures", "lastError"}``."""
        return [
            {"url": redact_url(url), "state": h.status, "failures": h.failures, "lastError": h.last_error}
            for url, h in ((url, self._rpc_health[url]) for url in self.rpc_urls)
        ]

    def _url_order(self) -> list[str]:
        now = self._clock()
        up = [url for url in self.rpc_urls if self._rpc_health[url].down_until <= now]
        return up + [url for url in self.rpc_urls if url not in up]

    async def _http(self, body: Any) -> Any:
        # Compact JSON, as json.dumps(ensure_ascii=False, separators=(",", ":")) writes the hex strings
        # and numbers sent here (non-ASCII would go as UTF-8, not \u escapes): pydantic's Rust encoder,
        # a fifth of the time on a batch (bench/http_client_cpu.py).
        data = to_json(body)
        failure: BaseException | None = None
        for url in self._url_order():
            health = self._rpc_health[url]
            try:
                answer = await self._http_at(url, data)
            except Exception as exc:  # noqa: BLE001 - any failure of this node: the next one is asked
                failure = exc
                health.status, health.last_error = "down", type(exc).__name__
                health.failures += 1
                health.down_until = self._clock() + RPC_DOWN_SECONDS
                if len(self.rpc_urls) > 1:
                    log.warning("chain RPC %s failed (%s)", redact_url(url), type(exc).__name__)
                continue
            health.status, health.failures, health.last_error, health.down_until = "up", 0, None, 0.0
            return answer
        assert failure is not None
        raise failure

    async def _http_at(self, url: str, data: bytes) -> Any:
        for attempt in range(2):
            try:
                async with self._client().post(url, data=data) as reply:
                    if reply.status == 429:
                        raise _UnusableStatus("HTTP 429")
                    try:
                        raw = await reply.read()
                        # An empty body is no answer (None), as aiohttp's ``json()`` read it before.
                        return json.loads(raw) if raw.strip() else None
                    except (ValueError, RecursionError):
                        if reply.status >= 500:
                            raise _UnusableStatus(f"HTTP {reply.status}") from None
                        raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A kept-alive connection the node had closed: the request never reached it. Every
                # call sent here is safe to repeat (reads, and broadcasts of one signed transaction,
                # which can be mined only once), so it goes again, once, on a fresh connection.
                if attempt:
                    raise
        raise AssertionError("unreachable")


class RpcError(ChainUnavailable):
    """The node answered with a JSON-RPC error (a revert, a nonce error, ...)."""

    code = "chain_rpc_error"

    def __init__(self, method: str, rpc_message: str) -> None:
        super().__init__(f"chain RPC {method} returned an error")
        self.rpc_message = rpc_message
