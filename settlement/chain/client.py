"""Chain access for the exact-EVM scheme: the few reads and the one write settlement needs.

One pooled aiohttp session per chain client speaks JSON-RPC; the settlement account's nonce is tracked
locally (and resynced after a nonce error), gas and fees are fixed or cached, so a settlement is
sign + ``eth_sendRawTransaction`` + receipt, never web3's estimate/fee/nonce round trips.
web3 and RPC errors are translated here into ``ChainUnavailable``.

Under load, settlements are pipelined rather than serialised:

- calls made while a JSON-RPC request is in flight are coalesced into one JSON-RPC *batch* (one HTTP
  round trip for every read, broadcast and receipt poll waiting at that moment). A node spends far
  less per call on a batch than on as many concurrent requests (``bench/results.txt``);
- a settlement takes the next nonce and signs without waiting for earlier settlements to be mined or
  even broadcast; its write-ahead hook runs concurrently with the others'. Nodes queue a transaction
  whose nonce is ahead until the gap fills, so broadcasts may arrive in any order. A nonce that will
  never be broadcast (the write-ahead failed, the node refused the transaction) is handed back and
  reused by the next settlement, or filled at once with a zero-value transaction when later nonces
  are already out, so nothing stays queued behind a gap.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_hash.auto import keccak

from settlement.schemes.eip712 import TransferAuthorization, split_signature
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.chain.transaction import TransactionSigner


log = logging.getLogger("x402gw.chain")


def selector(signature: str) -> bytes:
    return keccak(signature.encode("ascii"))[:4]


SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
SEL_BALANCE_OF = selector("balanceOf(address)")
SEL_NAME = selector("name()")
SEL_VERSION = selector("version()")
SEL_DECIMALS = selector("decimals()")
SEL_TRANSFER = selector("transfer(address,uint256)")
SEL_TRANSFER_WITH_AUTHORIZATION = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
TOPIC_TRANSFER = keccak(b"Transfer(address,address,uint256)")
TOPIC_AUTHORIZATION_USED = keccak(b"AuthorizationUsed(address,bytes32)")

TRANSFER_GAS_LIMIT = 150_000
FILLER_GAS_LIMIT = 21_000
FEE_CACHE_SECONDS = 10.0
# JSON-RPC coalescing: at most this many calls per batch, this many batches in flight at once per
# lane. Broadcasts have a lane of their own: a node may take a while over a batch of them (anvil
# mines a block per transaction before it answers), and reads and receipt polls must not queue
# behind that.
MAX_BATCH_CALLS = 100
MAX_BATCHES_IN_FLIGHT = 2
SEND_LANE = "eth_sendRawTransaction"
# After a broadcast whose answer was lost: when to check that the node has it (and send it again).
REBROADCAST_DELAYS = (0.5, 2.0, 5.0, 15.0, 30.0, 60.0)
# A transaction of ours not mined after this long is looked up (then after 2x, 4x... as long).
UNMINED_CHECK_SECONDS = 1.0
# The receipt poller looks at the chain head this often: soon after a new block, then backing off.
RECEIPT_POLL_MIN = 0.002
RECEIPT_POLL_MAX = 0.1
MAX_REMEMBERED_RAW = 10_000


@dataclass(frozen=True, slots=True)
class LogEntry:
    address: str
    topics: tuple[bytes, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    logs: tuple[LogEntry, ...] = field(default=())

    def has_transfer(self, token: str, from_: str, to: str, value: int) -> bool:
        want = (TOPIC_TRANSFER, _topic_address(from_), _topic_address(to))
        for log in self.logs:
            if log.address.lower() == token.lower() and log.topics[:3] == want:
                if int.from_bytes(log.data[:32], "big") == value:
                    return True
        return False

    def has_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        """The token's ``AuthorizationUsed(authorizer, nonce)`` is in this receipt: this transaction
        used that very authorization (a batch receipt holds many Transfer logs; this one is unique)."""
        want = (TOPIC_AUTHORIZATION_USED, _topic_address(authorizer), nonce)
        return any(log.address.lower() == token.lower() and log.topics[:3] == want for log in self.logs)


def _topic_address(address: str) -> bytes:
    return bytes.fromhex(address[2:].lower()).rjust(32, b"\x00")


# Called with the transaction hash after signing and before broadcasting: the write-ahead hook.
BeforeSend = Callable[[str], Awaitable[None]]


class Chain(Protocol):
    """What the local facilitator needs from a chain."""

    chain_id: int

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool: ...

    async def balance_of(self, token: str, owner: str) -> int: ...

    async def send_transfer_with_authorization(
        self, token: str, auth: TransferAuthorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str: ...

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...

    async def block_number(self) -> int: ...


class Web3Chain:
    """Chain access over JSON-RPC through web3's async provider."""

    def __init__(self, rpc_url: str, chain_id: int, settlement_key: str | None, *, request_timeout: float = 10.0):
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self._request_timeout = request_timeout
        # JSON-RPC over one pooled aiohttp session (created on first use, in the loop that uses it):
        # web3's provider layer costs ≈3× the round trip itself on this path (bench/profile_gateway.py).
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._request_id = 0
        self._account = Account.from_key(settlement_key) if settlement_key else None
        self._signer = TransactionSigner(settlement_key) if settlement_key else None
        self._nonce: int | None = None  # the next nonce never handed out
        self._free_nonces: list[int] = []  # handed back (never broadcast): reused lowest first
        self._nonce_lock = asyncio.Lock()
        self._fees: tuple[float, int, int] | None = None  # (fetched_at, max_fee, priority_fee)
        # Calls waiting for the next JSON-RPC batch, and the batches in flight.
        self._waiting: dict[bool, list[tuple[dict[str, Any], asyncio.Future[Any]]]] = {False: [], True: []}
        self._in_flight = {False: 0, True: 0}  # by lane: broadcasts (True) or everything else
        self._send_order: dict[int, int] = {}  # JSON-RPC id of a waiting broadcast → its nonce
        self._batching = True  # off for a node that does not answer batches
        self._tasks: set[asyncio.Task[None]] = set()
        # Signed transactions of ours not yet seen mined, to send again if the node forgets one.
        self._sent_raw: dict[str, str] = {}
        # Receipt waiters by lowercase hash, and the poller that reads new blocks for them.
        self._receipt_waiters: dict[str, list[asyncio.Future[Receipt]]] = {}
        self._receipt_poller: asyncio.Future[None] | None = None
        self._receipts_from: int | None = None  # the first block the poller has not read
        self._block_receipts = True  # off for a node without eth_getBlockReceipts

    @property
    def settlement_address(self) -> str | None:
        return self._account.address if self._account else None

    async def close(self) -> None:
        """Stops the poller and background sends (a pending settlement is resolved by the next
        start-up's reconcile) and fails the calls still queued."""
        poller, self._receipt_poller = self._receipt_poller, None
        for task in [poller, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
        for calls in self._waiting.values():
            for _, future in calls:
                if not future.done():
                    future.set_exception(ChainUnavailable("the chain client is closed"))
            calls.clear()
        self._in_flight = {False: 0, True: 0}
        self._send_order.clear()
        session, self._session = self._session, None
        if session is not None and not session.closed and self._session_loop is asyncio.get_running_loop():
            await session.close()

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
        except Exception as exc:  # OSError, timeouts, aiohttp errors, a body that is not JSON: infrastructure
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

    async def _call(self, to: str, data: bytes) -> bytes:
        result = await self._rpc("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"])
        return bytes.fromhex(str(result)[2:])

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        out = await self._call(token, SEL_AUTHORIZATION_STATE + abi_encode(["address", "bytes32"], [authorizer, nonce]))
        return bool(int.from_bytes(out[:32], "big"))

    async def balance_of(self, token: str, owner: str) -> int:
        out = await self._call(token, SEL_BALANCE_OF + abi_encode(["address"], [owner]))
        return int.from_bytes(out[:32], "big")

    async def token_metadata(self, token: str) -> tuple[str, str, int]:
        name = abi_decode(["string"], await self._call(token, SEL_NAME))[0]
        version = abi_decode(["string"], await self._call(token, SEL_VERSION))[0]
        decimals = int.from_bytes((await self._call(token, SEL_DECIMALS))[:32], "big")
        return str(name), str(version), decimals

    async def remote_chain_id(self) -> int:
        return int(await self._rpc("eth_chainId", []), 16)

    async def block_number(self) -> int:
        return int(await self._rpc("eth_blockNumber", []), 16)

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > FEE_CACHE_SECONDS:
            block = await self._rpc("eth_getBlockByNumber", ["latest", False])
            base_fee = int(block.get("baseFeePerGas", "0x0"), 16)
            priority = 1_000_000  # 0.001 gwei tip; the base fee dominates on L2s and anvil
            self._fees = (now, 2 * base_fee + priority, priority)
        return self._fees[1], self._fees[2]

    async def send_transfer_with_authorization(
        self, token: str, auth: TransferAuthorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str:
        if self._account is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        v, r, s = split_signature(signature)
        calldata = SEL_TRANSFER_WITH_AUTHORIZATION + abi_encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
            [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce, v, r, s],
        )
        return await self.send_call(token, calldata, before_send)

    async def send_call(
        self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = TRANSFER_GAS_LIMIT
    ) -> str:
        """Sign and broadcast a call from the settlement account; the hash is reported first.

        Several calls may be between signing and broadcast at once, each with its own nonce."""
        if self._signer is None or self._account is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        max_fee, priority = await self._fees_now()
        for attempt in range(2):
            nonce = await self._take_nonce()
            signed = self._signer.sign(
                chain_id=self.chain_id, nonce=nonce, to=to, data=calldata, gas=gas,
                max_fee_per_gas=max_fee, max_priority_fee_per_gas=priority,
            )
            tx_hash_local = "0x" + signed.hash.hex()
            if before_send is not None:
                try:
                    await before_send(tx_hash_local)
                except BaseException:
                    self._give_back(nonce)  # never broadcast
                    raise
            raw = "0x" + signed.raw.hex()
            self._remember_raw(tx_hash_local, raw)
            send = asyncio.ensure_future(self._rpc("eth_sendRawTransaction", [raw], order=nonce))
            try:
                # Shielded: a caller that goes away (a client disconnect) does not leave its nonce
                # unaccounted for; what the node says is still dealt with.
                tx_hash = await asyncio.shield(send)
            except asyncio.CancelledError:
                send.add_done_callback(lambda done, n=nonce, r=raw, h=tx_hash_local: self._spawn(
                    self._after_abandoned_send(done, n, r, h)))
                raise
            except RpcError as exc:
                message = exc.rpc_message.lower()
                log.warning("the node refused settlement transaction %s (nonce %d): %s", tx_hash_local, nonce,
                            exc.rpc_message[:200])
                if "already known" in message or "known transaction" in message or "already imported" in message:
                    return tx_hash_local  # this very transaction is in the node's pool already
                if "nonce" in message and ("low" in message or "already" in message or "used" in message):
                    # Our own broadcast, repeated after a lost answer, may be what used the nonce.
                    if await self._known(tx_hash_local, raw):
                        return tx_hash_local
                    # Someone else used the account (another process, a restart): resync once.
                    await self._resync_nonce()
                    if attempt == 0:
                        continue
                    raise
                # A repeated send (``_http``'s retry) of a transaction the node has, whatever words
                # it uses for that; otherwise refused outright, and the nonce is still free.
                if await self._known(tx_hash_local, raw):
                    return tx_hash_local
                self._give_back(nonce)
                raise
            except ChainUnavailable as exc:
                log.warning("no answer to the broadcast of %s (nonce %d): %s; it will be sent again",
                            tx_hash_local, nonce, exc)
                # Sent, answer lost: the node may have it. The nonce stays consumed; the hash is
                # reported so the outcome can be resolved against the chain. If the node never got
                # it, every later settlement would queue behind its nonce: it is broadcast again
                # (the same signed transaction, mined at most once) until the node knows it.
                self._spawn(self._rebroadcast(raw, tx_hash_local))
                raise BroadcastUncertain(tx_hash_local) from None
            return str(tx_hash)
        raise ChainUnavailable("could not allocate a settlement nonce", code="settlement_nonce_error")

    async def _after_abandoned_send(self, send: asyncio.Future[Any], nonce: int, raw: str, tx_hash: str) -> None:
        """What ``send_call`` would have done with the broadcast's outcome, had its caller stayed."""
        if send.cancelled() or send.exception() is None:
            return
        exc = send.exception()
        if isinstance(exc, RpcError):
            message = exc.rpc_message.lower()
            if "already" in message or "known transaction" in message or "nonce" in message:
                return  # in the pool, or the nonce is used: no gap of ours
            try:
                if await self._known(tx_hash, raw):
                    return
            except BroadcastUncertain:
                return  # resent until known
            self._give_back(nonce)
        elif isinstance(exc, ChainUnavailable):
            self._spawn(self._rebroadcast(raw, tx_hash))

    async def _known(self, tx_hash: str, raw: str) -> bool:
        """Whether the node has our transaction; not knowing is not "no": the broadcast may have
        landed, so a failed lookup is an uncertain broadcast (resent until the node knows it)."""
        try:
            return await self._rpc("eth_getTransactionByHash", [tx_hash]) is not None
        except ChainUnavailable:
            self._spawn(self._rebroadcast(raw, tx_hash))
            raise BroadcastUncertain(tx_hash) from None

    async def _rebroadcast(self, raw: str, tx_hash: str) -> None:
        for delay in REBROADCAST_DELAYS:
            await asyncio.sleep(delay)
            try:
                await self._send_if_unknown(raw, tx_hash)
                return
            except ChainUnavailable:
                continue  # the node is still away: try again later

    async def _send_if_unknown(self, raw: str, tx_hash: str) -> None:
        """Sends our signed transaction again if the node does not know it (pending or mined);
        raises ``ChainUnavailable`` when the node cannot be asked."""
        if await self._rpc("eth_getTransactionByHash", [tx_hash]) is not None:
            return
        log.warning("the node does not know settlement transaction %s: sending it again", tx_hash)
        try:
            await self._rpc("eth_sendRawTransaction", [raw])
        except RpcError:
            pass  # known by now, or its nonce used (by it): nothing to fill

    async def _take_nonce(self) -> int:
        if self._free_nonces:
            return heapq.heappop(self._free_nonces)
        if self._nonce is None:
            async with self._nonce_lock:
                if self._nonce is None:
                    assert self._account is not None
                    count = await self._rpc("eth_getTransactionCount", [self._account.address, "pending"])
                    self._nonce = int(count, 16)
        nonce = self._nonce
        self._nonce = nonce + 1
        return nonce

    async def _resync_nonce(self) -> None:
        assert self._account is not None
        async with self._nonce_lock:
            count = int(await self._rpc("eth_getTransactionCount", [self._account.address, "pending"]), 16)
            self._nonce = max(self._nonce or 0, count)
            self._free_nonces = [n for n in self._free_nonces if n >= count]
            heapq.heapify(self._free_nonces)

    def _give_back(self, nonce: int) -> None:
        """A nonce that will not be broadcast. The last one handed out is simply taken back; one with
        later nonces already out leaves a gap that queues them at the node: reuse it, or fill it."""
        if self._nonce is not None and nonce == self._nonce - 1:
            self._nonce = nonce
            return
        heapq.heappush(self._free_nonces, nonce)
        log.warning("settlement nonce %d freed with later ones out: it is reused or filled", nonce)
        self._spawn(self._fill_gap())

    async def _fill_gap(self) -> None:
        """A zero-value transaction to ourselves on the lowest handed-back nonce, unless a settlement
        took it meanwhile; the nonce goes back to the pool if the node refuses this one too."""
        if not self._free_nonces or self._signer is None or self._account is None:
            return
        nonce = heapq.heappop(self._free_nonces)
        try:
            max_fee, priority = await self._fees_now()
        except ChainUnavailable:
            heapq.heappush(self._free_nonces, nonce)  # nothing signed or sent: still free
            return
        signed = self._signer.sign(
            chain_id=self.chain_id, nonce=nonce, to=self._account.address, data=b"", gas=FILLER_GAS_LIMIT,
            max_fee_per_gas=max_fee, max_priority_fee_per_gas=priority,
        )
        raw = "0x" + signed.raw.hex()
        try:
            await self._rpc("eth_sendRawTransaction", [raw])
        except RpcError as exc:
            if "nonce" in exc.rpc_message.lower():
                return  # used by now (by us or another process): no gap any more
            heapq.heappush(self._free_nonces, nonce)
        except ChainUnavailable:
            # It may never have reached the node, and nothing resyncs on a queue: sent again until known.
            self._spawn(self._rebroadcast(raw, "0x" + signed.hash.hex()))

    async def send_transfer(self, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> str:
        """A plain ERC-20 transfer from this chain client's account (refunds)."""
        return await self.send_call(token, SEL_TRANSFER + abi_encode(["address", "uint256"], [to, amount]), before_send)

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        """The receipt of the transaction that used (authorizer, nonce), from the token's logs."""
        logs = await self._rpc(
            "eth_getLogs",
            [{
                "address": token,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": ["0x" + TOPIC_AUTHORIZATION_USED.hex(), "0x" + _topic_address(authorizer).hex(), "0x" + nonce.hex()],
            }],
        )
        if not logs:
            return None
        return await self.get_receipt(logs[0]["transactionHash"])

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        raw = await self._rpc("eth_getTransactionReceipt", [tx_hash])
        return None if raw is None else _receipt(tx_hash, raw)

    async def get_logs(
        self, address: str, topics: list[str | list[str] | None], from_block: int, to_block: int
    ) -> list[dict[str, Any]]:
        """Raw ``eth_getLogs`` entries of one contract over an inclusive block range (reconcile)."""
        logs = await self._rpc(
            "eth_getLogs",
            [{"address": address, "fromBlock": hex(from_block), "toBlock": hex(to_block), "topics": topics}],
        )
        return list(logs or [])

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        """The receipt, or None when the transaction is still not mined after ``timeout`` seconds.

        Many settlements wait at once: rather than each polling its own receipt, one poller follows
        the chain head and reads each new block's receipts in one call (``eth_getBlockReceipts``),
        handing each waiter its own. A transaction of ours still unmined after a while is looked up:
        a node that no longer has it (dropped from its pool; anvil can lose one of a burst of
        consecutive nonces) gets the same signed transaction again, or every later nonce would wait
        behind it."""
        started = time.monotonic()
        deadline = started + timeout
        check_at = started + UNMINED_CHECK_SECONDS
        key = tx_hash.lower()
        future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._receipt_waiters.setdefault(key, []).append(future)
        try:
            # Registered first, then asked directly: a receipt mined up to this head is found here,
            # one mined after it by the poller (which reads the blocks after this head).
            head, receipt = await asyncio.gather(self.block_number(), self.get_receipt(tx_hash))
            if receipt is not None:
                return self._mined(key, receipt)
            self._scan_from(head)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return None
                done, _ = await asyncio.wait({future}, timeout=min(deadline, check_at) - now)
                if done:
                    return self._mined(key, future.result())
                if time.monotonic() >= check_at:
                    check_at = time.monotonic() + 2 * (check_at - started)
                    receipt = await self.get_receipt(tx_hash)  # whatever the poller saw: ask
                    if receipt is not None:
                        return self._mined(key, receipt)
                    await self._send_again_if_forgotten(tx_hash)
        finally:
            waiters = self._receipt_waiters.get(key)
            if waiters is not None:
                if future in waiters:
                    waiters.remove(future)
                if not waiters:
                    del self._receipt_waiters[key]
            if not future.done():
                future.cancel()

    def _mined(self, key: str, receipt: Receipt) -> Receipt:
        self._sent_raw.pop(key, None)
        return receipt

    def _scan_from(self, head: int) -> None:
        """The poller reads every block after ``head`` (again, if it had already read some)."""
        if self._receipts_from is None or head + 1 < self._receipts_from:
            self._receipts_from = head + 1
        if self._receipt_poller is None or self._receipt_poller.done():
            self._receipt_poller = asyncio.ensure_future(self._poll_receipts())

    async def _poll_receipts(self) -> None:
        delay = RECEIPT_POLL_MIN
        try:
            while self._receipt_waiters:
                try:
                    head = await self.block_number()
                    start = self._receipts_from
                    if start is not None and head >= start:
                        for number in range(start, head + 1):
                            await self._read_block(number)
                            if self._receipts_from is not None and self._receipts_from == number:
                                self._receipts_from = number + 1
                        delay = RECEIPT_POLL_MIN
                    else:
                        delay = min(delay * 1.5, RECEIPT_POLL_MAX)
                except ChainUnavailable:
                    delay = RECEIPT_POLL_MAX  # the waiters' own checks go on; try again later
                except Exception:  # a malformed answer: the waiters' own checks go on
                    log.exception("receipt poller: unexpected answer from the node")
                    delay = RECEIPT_POLL_MAX
                await asyncio.sleep(delay)
        finally:
            self._receipts_from = None

    async def _read_block(self, number: int) -> None:
        if self._block_receipts:
            try:
                raws = await self._rpc("eth_getBlockReceipts", [hex(number)])
            except RpcError:
                self._block_receipts = False  # not offered by this node: each waiter asks for its own
            else:
                for raw in raws or []:
                    key = str(raw.get("transactionHash", "")).lower()
                    if key in self._receipt_waiters:
                        self._resolve(key, _receipt(str(raw["transactionHash"]), raw))
                return
        waiting = list(self._receipt_waiters)
        receipts = await asyncio.gather(*(self.get_receipt(h) for h in waiting), return_exceptions=True)
        for key, receipt in zip(waiting, receipts):
            if isinstance(receipt, Receipt):
                self._resolve(key, receipt)

    def _resolve(self, key: str, receipt: Receipt) -> None:
        for future in self._receipt_waiters.get(key, []):
            if not future.done():
                future.set_result(receipt)

    async def _send_again_if_forgotten(self, tx_hash: str) -> None:
        raw = self._sent_raw.get(tx_hash.lower())
        if raw is None:
            return  # not sent by this client: nothing to send again
        try:
            await self._send_if_unknown(raw, tx_hash)
        except ChainUnavailable:
            pass  # the node is away: the next check tries again

    def _remember_raw(self, tx_hash: str, raw: str) -> None:
        self._sent_raw[tx_hash.lower()] = raw
        if len(self._sent_raw) > MAX_REMEMBERED_RAW:
            self._sent_raw.pop(next(iter(self._sent_raw)))


def _receipt(tx_hash: str, raw: dict[str, Any]) -> Receipt:
    logs = tuple(
        LogEntry(
            address=log["address"],
            topics=tuple(bytes.fromhex(t[2:]) for t in log["topics"]),
            data=bytes.fromhex(log["data"][2:]),
        )
        for log in raw.get("logs", [])
    )
    return Receipt(tx_hash=tx_hash, status=int(raw["status"], 16), block_number=int(raw["blockNumber"], 16), logs=logs)


class RpcError(ChainUnavailable):
    """The node answered with a JSON-RPC error (a revert, a nonce error, ...)."""

    code = "chain_rpc_error"

    def __init__(self, method: str, rpc_message: str) -> None:
        super().__init__(f"chain RPC {method} returned an error")
        self.rpc_message = rpc_message
