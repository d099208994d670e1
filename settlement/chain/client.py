"""Chain access for the exact-EVM scheme: the few reads and the one write settlement needs.

``JsonRpcChain`` speaks raw JSON-RPC over one pooled aiohttp session (no web3 provider): the
settlement account's nonce is tracked locally (and resynced after a nonce error), gas and fees are
fixed or cached, so a settlement is sign + ``eth_sendRawTransaction`` + receipt, never web3's
estimate/fee/nonce round trips. RPC errors are translated into ``ChainUnavailable``.

Its parts, one module each: ``rpc`` (transport and batching), ``broadcast`` (nonces, signing,
broadcasts and rebroadcasts), ``receipts`` (the receipt poller). Under load, settlements are
pipelined rather than serialised (see those modules).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_hash.auto import keccak

from settlement.chain.authorization import Eip3009Authorization, split_signature
from settlement.chain.broadcast import TRANSFER_GAS_LIMIT, BeforeSend, BroadcastLane
from settlement.chain.head_clock import HeadClock
from settlement.chain.receipts import (
    TOPIC_AUTHORIZATION_CANCELED,
    TOPIC_AUTHORIZATION_USED,
    TOPIC_TRANSFER,
    LogEntry,
    Receipt,
    ReceiptPoller,
    _topic_address,
)
from settlement.chain.rpc import RpcError, RpcUrlHealth, rpc_url_list
from settlement.chain.transaction import TransactionSigner
from settlement.errors import ChainUnavailable

__all__ = [
    "SEL_AUTHORIZATION_STATE",
    "SEL_BALANCE_OF",
    "SEL_DECIMALS",
    "SEL_NAME",
    "SEL_TRANSFER",
    "SEL_TRANSFER_WITH_AUTHORIZATION",
    "SEL_TRANSFER_WITH_AUTHORIZATION_BYTES",
    "SEL_VERSION",
    "TOPIC_AUTHORIZATION_USED",
    "TOPIC_TRANSFER",
    "TRANSFER_GAS_LIMIT",
    "WALLET_TRANSFER_GAS_LIMIT",
    "BeforeSend",
    "Chain",
    "JsonRpcChain",
    "LogEntry",
    "Receipt",
    "RpcError",
    "selector",
    "transfer_with_signature_bytes_calldata",
]


def address_word(address: str) -> bytes:
    """An address as an ABI word (what ``eth_abi`` encodes for ``address``), written out: these
    calls run on every paid request and ``eth_abi``'s generic encoder cost more than the call."""
    raw = bytes.fromhex(address[2:]) if address[:2] in ("0x", "0X") else b""
    if len(raw) != 20:
        raise ValueError(f"not an address: {address!r}")
    return raw.rjust(32, b"\x00")


def uint_word(value: int) -> bytes:
    return value.to_bytes(32, "big")  # OverflowError beyond uint256 or below 0, as the ABI would refuse


def _bytes32(value: bytes) -> bytes:
    if len(value) != 32:
        raise ValueError("a bytes32 is 32 bytes")
    return value


def authorization_words(auth: Eip3009Authorization, v: int, r: bytes, s: bytes) -> bytes:
    """``(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)``: an authorization
    and its signature as nine static ABI words (tests hold them equal to ``eth_abi``'s encoding)."""
    if not 0 <= v < 256:
        raise ValueError("v is a uint8")
    return (address_word(auth.from_) + address_word(auth.to) + uint_word(auth.value) + uint_word(auth.valid_after)
            + uint_word(auth.valid_before) + _bytes32(auth.nonce) + uint_word(v) + _bytes32(r) + _bytes32(s))


def transfer_with_authorization_calldata(auth: Eip3009Authorization, v: int, r: bytes, s: bytes) -> bytes:
    """``transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)``."""
    return SEL_TRANSFER_WITH_AUTHORIZATION + authorization_words(auth, v, r, s)


def transfer_with_signature_bytes_calldata(auth: Eip3009Authorization, signature: bytes) -> bytes:
    """``transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)``: a contract
    wallet's signature, passed to the token byte for byte."""
    return SEL_TRANSFER_WITH_AUTHORIZATION_BYTES + abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce, signature],
    )


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
# USDC v2.2's overload for any signature a contract wallet (ERC-1271) accepts: 0xcf092995.
SEL_TRANSFER_WITH_AUTHORIZATION_BYTES = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
# A contract wallet's check runs inside the transfer: more gas than an ecrecover.
WALLET_TRANSFER_GAS_LIMIT = 400_000
# find_authorization_used on a node that caps eth_getLogs ranges: windows of this many blocks, back
# from the head over at most LOG_SCAN_BLOCKS (two days of 2-second blocks).
LOG_WINDOW_BLOCKS = 2_000
LOG_SCAN_BLOCKS = 100_000


class Chain(Protocol):
    """What the local facilitator needs from a chain."""

    chain_id: int

    @property
    def settlement_address(self) -> str | None: ...

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool: ...

    async def balance_of(self, token: str, owner: str) -> int: ...

    async def send_transfer_with_authorization(
        self, token: str, auth: Eip3009Authorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str: ...

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...

    async def block_number(self) -> int: ...

    async def get_code(self, address: str) -> bytes: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...


class JsonRpcChain(BroadcastLane, ReceiptPoller):
    """Chain access over raw JSON-RPC (aiohttp): reads, the settlement account's sends, receipts."""

    def __init__(
        self, rpc_url: str | Sequence[str], chain_id: int, settlement_key: str | None, *, request_timeout: float = 10.0
    ):
        # One URL, or several in order of preference: calls fail over between them (``rpc``).
        self.rpc_urls = rpc_url_list(rpc_url)
        self.rpc_url = self.rpc_urls[0]
        self._rpc_health = {url: RpcUrlHealth() for url in self.rpc_urls}
        self._clock = time.monotonic
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
        # The chain's clock (the head's timestamp), which payment windows are judged by beside ours.
        self.head_clock = HeadClock(self)

    @property
    def settlement_address(self) -> str | None:
        return self._account.address if self._account else None

    def sign_digest(self, digest: bytes) -> bytes:
        """The settlement account's r ‖ s ‖ v signature of a 32-byte digest (EIP-712 typed data it
        authorizes, e.g. a batch-settlement claim); the key never leaves this client."""
        if self._signer is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        return self._signer.sign_digest(digest)

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

    async def _call(self, to: str, data: bytes) -> bytes:
        result = await self._rpc("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"])
        return bytes.fromhex(str(result)[2:])

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes:
        """One ``eth_call`` at the latest block, its gas capped when ``gas`` is given, from
        ``sender`` when given (a simulation of our own transaction); a revert is an ``RpcError``
        (``rpc_message`` says why)."""
        call: dict[str, str] = {"to": to, "data": "0x" + data.hex()}
        if gas is not None:
            call["gas"] = hex(gas)
        if sender is not None:
            call["from"] = sender
        result = await self._rpc("eth_call", [call, "latest"])
        return bytes.fromhex(str(result)[2:])

    async def get_code(self, address: str) -> bytes:
        return bytes.fromhex(str(await self._rpc("eth_getCode", [address, "latest"]))[2:])

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        out = await self._call(token, SEL_AUTHORIZATION_STATE + address_word(authorizer) + _bytes32(nonce))
        return bool(int.from_bytes(out[:32], "big"))

    async def balance_of(self, token: str, owner: str) -> int:
        out = await self._call(token, SEL_BALANCE_OF + address_word(owner))
        return int.from_bytes(out[:32], "big")

    async def token_metadata(self, token: str) -> tuple[str, str, int]:
        name = abi_decode(["string"], await self._call(token, SEL_NAME))[0]
        version = abi_decode(["string"], await self._call(token, SEL_VERSION))[0]
        decimals = int.from_bytes((await self._call(token, SEL_DECIMALS))[:32], "big")
        return str(name), str(version), decimals

    async def remote_chain_id(self) -> int:
        return int(await self._rpc("eth_chainId", []), 16)

    async def send_transfer_with_authorization(
        self, token: str, auth: Eip3009Authorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str:
        if self._account is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        v, r, s = split_signature(signature)
        calldata = transfer_with_authorization_calldata(auth, v, r, s)
        return await self.send_call(token, calldata, before_send)

    async def send_transfer_with_signature_bytes(
        self, token: str, auth: Eip3009Authorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str:
        """``transferWithAuthorization`` through the ``bytes signature`` overload (0xcf092995), for
        a contract wallet's signature, passed to the token byte for byte."""
        calldata = transfer_with_signature_bytes_calldata(auth, signature)
        return await self.send_call(token, calldata, before_send, gas=WALLET_TRANSFER_GAS_LIMIT)

    async def send_transfer(self, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> str:
        """A plain ERC-20 transfer from this chain client's account (refunds)."""
        return await self.send_call(token, SEL_TRANSFER + abi_encode(["address", "uint256"], [to, amount]), before_send)

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        """Asked once the token says (authorizer, nonce) is used: the receipt of the transaction that
        used it (``AuthorizationUsed``) or cancelled it (``AuthorizationCanceled``; the caller finds no
        transfer in it), from the token's logs. Asked over the whole chain first; a node that refuses
        so wide a range (many providers cap ``eth_getLogs`` at a few thousand blocks) is asked again
        window by window back from the head, over the last ``LOG_SCAN_BLOCKS`` (a payment is resolved
        soon after it was signed). Neither log found: ``ChainUnavailable`` (unknown: a node that
        answers a range it does not hold with nothing, or a pruned one, would otherwise have our own
        settlement blamed on another use, the payment failed while its money moved)."""
        topics: list[str | list[str] | None] = [
            ["0x" + TOPIC_AUTHORIZATION_USED.hex(), "0x" + TOPIC_AUTHORIZATION_CANCELED.hex()],
            "0x" + _topic_address(authorizer).hex(), "0x" + nonce.hex(),
        ]
        try:
            logs = await self.get_logs(token, topics, 0, -1)
        except RpcError:
            logs = await self._scan_back(token, topics)
        if not logs:
            raise ChainUnavailable("the token says this authorization is used, but no log of its use or cancellation was found",
                                   code="authorization_use_not_found")
        return await self.get_receipt(logs[0]["transactionHash"])

    async def _scan_back(self, token: str, topics: list[str | list[str] | None]) -> list[dict[str, Any]]:
        head = await self.block_number()
        to_block = head
        while to_block >= 0 and head - to_block < LOG_SCAN_BLOCKS:
            from_block = max(0, to_block - LOG_WINDOW_BLOCKS + 1)
            logs = await self.get_logs(token, topics, from_block, to_block)
            if logs:
                return logs
            to_block = from_block - 1
        if to_block < 0:
            return []  # the whole chain was read: there is no such log
        raise ChainUnavailable(f"no AuthorizationUsed log in the last {LOG_SCAN_BLOCKS} blocks, and the node refuses "
                               "a wider range", code="chain_logs_out_of_range")

    async def traced_revert(self, tx_hash: str) -> str | None:
        """Why a mined transaction reverted, as the node's tracer says (``debug_traceTransaction``,
        callTracer: its revert reason, else its error); None when the node does not trace."""
        trace = await self._call_trace(tx_hash)
        return (str(trace.get("revertReason") or trace.get("error") or "") or None) if trace is not None else None

    async def _call_trace(self, tx_hash: str) -> dict[str, Any] | None:
        """``debug_traceTransaction`` with the callTracer: the top frame; None when the node does not trace."""
        try:
            trace = await self._rpc("debug_traceTransaction", [tx_hash, {"tracer": "callTracer"}])
        except (RpcError, ChainUnavailable):
            return None
        return trace if isinstance(trace, dict) else None

    async def traced_calls(self, tx_hash: str) -> list[tuple[str, str, bytes]] | None:
        """The plain calls (``CALL``) a mined transaction made that took effect, as (from, to, input):
        ``debug_traceTransaction``'s callTracer frames, leaving out any that failed and everything under
        them (a failed frame's effects are undone). Every frame is read: the node's answer is in memory
        whole already, and a cut-off read would miss a call hidden behind padding. None when the node
        does not trace."""
        trace = await self._call_trace(tx_hash)
        if trace is None:
            return None
        calls: list[tuple[str, str, bytes]] = []
        frames: list[Any] = [trace]
        while frames:
            frame = frames.pop()
            if not isinstance(frame, dict) or frame.get("error"):
                continue  # failed: neither it nor anything it called took effect
            if str(frame.get("type") or "").upper() == "CALL":
                try:
                    calls.append((str(frame.get("from") or ""), str(frame.get("to") or ""),
                                  bytes.fromhex(str(frame.get("input") or "0x")[2:])))
                except ValueError:
                    pass  # not hex: not a call we could have sent
            inner = frame.get("calls")
            frames.extend(inner if isinstance(inner, list) else [])
        return calls

    async def transaction_of(self, tx_hash: str) -> tuple[str, str, bytes] | None:
        """A transaction's sender, recipient and calldata (``eth_getTransactionByHash``); None when the
        node does not know it."""
        raw = await self._rpc("eth_getTransactionByHash", [tx_hash])
        if not isinstance(raw, dict):
            return None
        return str(raw.get("from") or ""), str(raw.get("to") or ""), bytes.fromhex(str(raw.get("input") or "0x")[2:])

    async def get_logs(
        self, address: str, topics: list[str | list[str] | None], from_block: int, to_block: int
    ) -> list[dict[str, Any]]:
        """Raw ``eth_getLogs`` entries of one contract over an inclusive block range (reconcile);
        ``to_block`` -1: the latest."""
        last = "latest" if to_block < 0 else hex(to_block)  # -1: up to the head
        logs = await self._rpc(
            "eth_getLogs",
            [{"address": address, "fromBlock": hex(from_block), "toBlock": last, "topics": topics}],
        )
        return list(logs or [])
