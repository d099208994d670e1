"""JSON-RPC over one pooled aiohttp session, with call coalescing.

Calls made while a JSON-RPC request is in flight are coalesced into one JSON-RPC *batch* (one HTTP
round trip for every read, broadcast and receipt poll waiting at that moment). A node spends far
less per call on a batch than on as many concurrent requests (``bench/results.txt``). Broadcasts
have a lane of their own, sent in nonce order. Transport errors become ``ChainUnavailable``; a
JSON-RPC error answer becomes ``RpcError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import aiohttp

from settlement.errors import ChainUnavailable

__all__ = ["MAX_BATCHES_IN_FLIGHT", "MAX_BATCH_CALLS", "SEND_LANE", "JsonRpcTransport", "RpcError"]

# JSON-RPC coalescing: at most this many calls per batch, this many batches in flight at once per
# lane. Broadcasts have a lane of their own: a node may take a while over a batch of them (anvil
# mines a block per transaction before it answers), and reads and receipt polls must not queue
# behind that.
MAX_BATCH_CALLS = 100
MAX_BATCHES_IN_FLIGHT = 2
SEND_LANE = "eth_sendRawTransaction"


class JsonRpcTransport:
    """The transport part of ``JsonRpcChain`` (whose ``__init__`` sets this state): ``_rpc`` is every
    other part's way to the node."""

    rpc_url: str
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
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._request_timeout), trust_env=False
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

    async def _http(self, body: Any) -> Any:
        data = json.dumps(body, separators=(",", ":")).encode()
        for attempt in range(2):
            try:
                async with self._client().post(
                    self.rpc_url, data=data, headers={"Content-Type": "application/json"}
                ) as reply:
                    return await reply.json(content_type=None, loads=json.loads)
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
