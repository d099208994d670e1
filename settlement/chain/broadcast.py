"""The broadcast lane: the settlement account's nonces, signing, and broadcasts that never leave a gap.

A settlement takes the next nonce and signs without waiting for earlier settlements to be mined or
even broadcast; its write-ahead hook runs concurrently with the others'. Nodes queue a transaction
whose nonce is ahead until the gap fills, so broadcasts may arrive in any order. A nonce that will
never be broadcast (the write-ahead failed, the node refused the transaction) is handed back and
reused by the next settlement, or filled at once with a zero-value transaction when later nonces
are already out, so nothing stays queued behind a gap. A broadcast whose answer was lost is sent
again (the same signed transaction, mined at most once) until the node knows it.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount

from settlement.chain.rpc import JsonRpcTransport, RpcError
from settlement.chain.transaction import TransactionSigner
from settlement.errors import BroadcastUncertain, ChainUnavailable

__all__ = [
    "FEE_CACHE_SECONDS",
    "FILLER_GAS_LIMIT",
    "MAX_REMEMBERED_RAW",
    "REBROADCAST_DELAYS",
    "TRANSFER_GAS_LIMIT",
    "BeforeSend",
    "BroadcastLane",
]

log = logging.getLogger("x402gw.chain")

TRANSFER_GAS_LIMIT = 150_000
FILLER_GAS_LIMIT = 21_000
FEE_CACHE_SECONDS = 10.0
# After a broadcast whose answer was lost: when to check that the node has it (and send it again).
REBROADCAST_DELAYS = (0.5, 2.0, 5.0, 15.0, 30.0, 60.0)
MAX_REMEMBERED_RAW = 10_000


# Called with the transaction hash after signing and before broadcasting: the write-ahead hook.
BeforeSend = Callable[[str], Awaitable[None]]


class BroadcastLane(JsonRpcTransport):
    """The sending part of ``JsonRpcChain`` (whose ``__init__`` sets this state)."""

    chain_id: int
    _account: LocalAccount | None
    _signer: TransactionSigner | None
    _nonce: int | None
    _free_nonces: list[int]
    _nonce_lock: asyncio.Lock
    _fees: tuple[float, int, int] | None
    _sent_raw: dict[str, str]

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > FEE_CACHE_SECONDS:
            block = await self._rpc("eth_getBlockByNumber", ["latest", False])
            base_fee = int(block.get("baseFeePerGas", "0x0"), 16)
            priority = 1_000_000  # 0.001 gwei tip; the base fee dominates on L2s and anvil
            self._fees = (now, 2 * base_fee + priority, priority)
        return self._fees[1], self._fees[2]

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
                send.add_done_callback(functools.partial(self._on_abandoned_send, nonce, raw, tx_hash_local))
                raise
            except RpcError as exc:
                if await self._refused(exc, nonce, raw, tx_hash_local, retry=attempt == 0):
                    return tx_hash_local
                continue
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

    async def _refused(self, exc: RpcError, nonce: int, raw: str, tx_hash: str, *, retry: bool) -> bool:
        """The node refused our broadcast: True if it has the transaction anyway (its hash is the
        answer), False to sign again on a fresh nonce (``retry``: once, after a resync); otherwise
        ``exc`` is raised, the nonce handed back if nothing used it."""
        message = exc.rpc_message.lower()
        log.warning("the node refused settlement transaction %s (nonce %d): %s", tx_hash, nonce,
                    exc.rpc_message[:200])
        if "already known" in message or "known transaction" in message or "already imported" in message:
            return True  # this very transaction is in the node's pool already
        if "nonce" in message and ("low" in message or "already" in message or "used" in message):
            # Our own broadcast, repeated after a lost answer, may be what used the nonce.
            if await self._known(tx_hash, raw):
                return True
            # Someone else used the account (another process, a restart): resync once.
            await self._resync_nonce()
            if retry:
                return False
            raise exc
        # A repeated send (``_http``'s retry) of a transaction the node has, whatever words
        # it uses for that; otherwise refused outright, and the nonce is still free.
        if await self._known(tx_hash, raw):
            return True
        self._give_back(nonce)
        raise exc

    def _on_abandoned_send(self, nonce: int, raw: str, tx_hash: str, send: asyncio.Future[Any]) -> None:
        """The done callback of a broadcast whose caller went away (cancelled while shielded)."""
        self._spawn(self._after_abandoned_send(send, nonce, raw, tx_hash))

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

    async def resend_if_forgotten(self, tx_hash: str) -> None:
        """Send our transaction again, the same signed one, if the node no longer has it (dropped
        from its pool): a pending payment's resolver asks, long after its request answered; a
        dropped transaction would leave its nonce a gap every later settlement waits behind. Only
        what this process signed (and still remembers) can be sent again."""
        await self._send_again_if_forgotten(tx_hash)

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
