"""Receipts: the ``Receipt`` type, and the poller that follows the chain head for every waiter.

Many settlements wait at once: rather than each polling its own receipt, one poller reads each new
block's receipts in one call (``eth_getBlockReceipts``) and hands each waiter its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from eth_hash.auto import keccak

from settlement.chain.rpc import JsonRpcTransport, RpcError
from settlement.errors import ChainUnavailable

__all__ = [
    "RECEIPT_POLL_MAX",
    "RECEIPT_POLL_MIN",
    "TOPIC_AUTHORIZATION_USED",
    "TOPIC_TRANSFER",
    "UNMINED_CHECK_SECONDS",
    "LogEntry",
    "Receipt",
    "ReceiptPoller",
    "address_topic",
]

log = logging.getLogger("x402gw.chain")

TOPIC_TRANSFER = keccak(b"Transfer(address,address,uint256)")
TOPIC_AUTHORIZATION_USED = keccak(b"AuthorizationUsed(address,bytes32)")
TOPIC_AUTHORIZATION_CANCELED = keccak(b"AuthorizationCanceled(address,bytes32)")
# A transaction of ours not mined after this long is looked up (then after 2x, 4x... as long).
UNMINED_CHECK_SECONDS = 1.0
# The receipt poller looks at the chain head this often: soon after a new block, then backing off.
RECEIPT_POLL_MIN = 0.002
RECEIPT_POLL_MAX = 0.1


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
    # What the sender paid: gasUsed × effectiveGasPrice wei (None: a node that does not report them).
    gas_used: int | None = None
    effective_gas_price: int | None = None
    sender: str | None = None  # the account that sent it (and paid its gas)

    @property
    def gas_cost(self) -> int | None:
        """Wei the sender paid for this transaction, or None when the node did not say."""
        if self.gas_used is None or self.effective_gas_price is None:
            return None
        return self.gas_used * self.effective_gas_price

    def has_transfer(self, token: str, from_: str, to: str, value: int) -> bool:
        want = (TOPIC_TRANSFER, _topic_address(from_), _topic_address(to))
        for log in self.logs:
            if log.address.lower() == token.lower() and log.topics[:3] == want:
                if int.from_bytes(log.data[:32], "big") == value:
                    return True
        return False

    def moved_under(self, token: str, authorizer: str, nonce: bytes, to: str, value: int) -> bool:
        """This very authorization moved ``value`` from ``authorizer`` to ``to``: the token's
        ``AuthorizationUsed(authorizer, nonce)`` log, and the log right after it the token's
        ``Transfer(authorizer, to, value)`` (FiatToken's order: ``transferWithAuthorization`` marks the
        nonce used, then transfers). A Transfer anywhere else in the receipt is another's: one
        transaction can use a second authorization of the payer on this nonce to pay someone else and
        make an identical transfer to ``to`` under a third, which must not count for this one."""
        used = (TOPIC_AUTHORIZATION_USED, _topic_address(authorizer), nonce)
        moved = (TOPIC_TRANSFER, _topic_address(authorizer), _topic_address(to))
        for index, log in enumerate(self.logs[:-1]):
            if log.address.lower() == token.lower() and log.topics[:3] == used:
                after = self.logs[index + 1]
                return (after.address.lower() == token.lower() and after.topics[:3] == moved
                        and int.from_bytes(after.data[:32], "big") == value)
        return False

    def has_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        """The token's ``AuthorizationUsed(authorizer, nonce)`` is in this receipt: this transaction
        used that very authorization (a batch receipt holds many Transfer logs; this one is unique)."""
        want = (TOPIC_AUTHORIZATION_USED, _topic_address(authorizer), nonce)
        return any(log.address.lower() == token.lower() and log.topics[:3] == want for log in self.logs)


def _topic_address(address: str) -> bytes:
    return bytes.fromhex(address[2:].lower()).rjust(32, b"\x00")


def address_topic(address: str) -> str:
    """An address as an ``eth_getLogs`` topic filter (a 32-byte word in hex)."""
    return "0x" + _topic_address(address).hex()


class ReceiptPoller(JsonRpcTransport):
    """The receipt part of ``JsonRpcChain`` (whose ``__init__`` sets this state)."""

    _sent_raw: dict[str, str]
    _receipt_waiters: dict[str, list[asyncio.Future[Receipt]]]
    _receipt_poller: asyncio.Future[None] | None
    _receipts_from: int | None
    _block_receipts: bool

    async def _send_again_if_forgotten(self, tx_hash: str) -> None:
        raise NotImplementedError  # the broadcast lane's (``BroadcastLane``)

    async def block_number(self) -> int:
        return int(await self._rpc("eth_blockNumber", []), 16)

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        raw = await self._rpc("eth_getTransactionReceipt", [tx_hash])
        return None if raw is None else _receipt(tx_hash, raw)

    async def block_timestamp(self, number: int | None = None) -> int:
        """The latest block's timestamp (or block ``number``'s): the clock a token judges an authorization's window by."""
        block = await self._rpc("eth_getBlockByNumber", ["latest" if number is None else hex(number), False])
        if not isinstance(block, dict) or not isinstance(block.get("timestamp"), str):
            raise ChainUnavailable("the node gave no latest block")
        return int(block["timestamp"], 16)

    async def next_block_timestamp(self) -> int:
        """The date the node would give its next block (its pending block's), the chain's clock now even
        on a chain that has made no block for a while; the latest block's where the node keeps no
        pending block (``RpcError`` or no answer for ``pending``)."""
        try:
            block = await self._rpc("eth_getBlockByNumber", ["pending", False])
        except RpcError:
            block = None
        if isinstance(block, dict) and isinstance(block.get("timestamp"), str):
            return int(block["timestamp"], 16)
        return await self.block_timestamp()

    async def knows_transaction(self, tx_hash: str) -> bool:
        """Whether the node has the transaction, mined or in its pool."""
        return await self._rpc("eth_getTransactionByHash", [tx_hash]) is not None

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
            scanning, receipt = await self._look(tx_hash, scan=True)
            if receipt is not None:
                return self._mined(key, receipt)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return None
                done, _ = await asyncio.wait({future}, timeout=min(deadline, check_at) - now)
                if done:
                    return self._mined(key, future.result())
                if time.monotonic() >= check_at:
                    check_at = time.monotonic() + 2 * (check_at - started)
                    started_scan, receipt = await self._look(tx_hash, scan=not scanning)  # whatever the poller saw: ask
                    scanning = scanning or started_scan
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

    async def _look(self, tx_hash: str, *, scan: bool) -> tuple[bool, Receipt | None]:
        """Whether the poller was set to read the blocks after the head (only with ``scan``, and only
        if the head was read), and the receipt if the node has it. A node that does not answer this
        once is not an outcome: the waiter asks again at its next check until its deadline; one
        failed call used to end the wait at once, a settlement reported pending that its receipt
        timeout would have seen mined."""
        if not scan:
            try:
                return False, await self.get_receipt(tx_hash)
            except ChainUnavailable:
                return False, None
        head, receipt = await asyncio.gather(self.block_number(), self.get_receipt(tx_hash), return_exceptions=True)
        for answer in (head, receipt):
            if isinstance(answer, BaseException) and not isinstance(answer, ChainUnavailable):
                raise answer
        if isinstance(head, int):
            self._scan_from(head)
        return isinstance(head, int), receipt if isinstance(receipt, Receipt) else None

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


def _receipt(tx_hash: str, raw: dict[str, Any]) -> Receipt:
    logs = tuple(
        LogEntry(
            address=log["address"],
            topics=tuple(bytes.fromhex(t[2:]) for t in log["topics"]),
            data=bytes.fromhex(log["data"][2:]),
        )
        for log in raw.get("logs", [])
    )
    gas_used, price = raw.get("gasUsed"), raw.get("effectiveGasPrice")
    return Receipt(
        tx_hash=tx_hash, status=int(raw["status"], 16), block_number=int(raw["blockNumber"], 16), logs=logs,
        gas_used=int(gas_used, 16) if isinstance(gas_used, str) else None,
        effective_gas_price=int(price, 16) if isinstance(price, str) else None,
        sender=raw["from"] if isinstance(raw.get("from"), str) else None,
    )
