"""What a reverted Permit2 settlement (upto's, or exact's through Permit2) was, read from the chain
after its receipt, so that neither the payer nor the gateway is wronged by a revert it did not cause:

- the permit's nonce used by a *copy* of our pending transaction (the exact proxy takes any sender,
  and the witness binds the payee and the amount: a griefer who resends our calldata with a higher
  tip, directly or wrapped in another contract's call, moves exactly this payment): the payment is
  settled, by that copy, never a charge without its answer (``copied_settlement``);
- the nonce used otherwise (``permit2_nonce_used``), the deadline passed by the chain's clock
  (``permit2_deadline_expired``), the payer's balance or its Permit2 allowance below the amount:
  explained, the payer's own doing or a race, never its code's;
- none of these: the scheme's "reverted" reason, which strikes a payer with code
  (``exact_guards.InFlight.struck``). A read that fails leaves ``settlement_reverted``: unexplained
  but unread, it strikes nobody.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Protocol

from eth_abi import decode as abi_decode
from x402.mechanisms.evm.constants import (
    ERR_PERMIT2_ALLOWANCE_REQUIRED,
    ERR_PERMIT2_DEADLINE_EXPIRED,
    ERR_PERMIT2_INSUFFICIENT_BALANCE,
)

from settlement.chain.broadcast import BeforeSend
from settlement.chain.client import LOG_SCAN_BLOCKS, LOG_WINDOW_BLOCKS, Receipt, RpcError
from settlement.chain.receipts import TOPIC_TRANSFER, address_topic
from settlement.errors import ChainUnavailable
from settlement.schemes.exact_permit2_payload import SEL_EXACT_SETTLE
from settlement.schemes.exact_resolve import mined_past
from settlement.schemes.upto_permit import PERMIT2_ADDRESS, SEL_UPTO_SETTLE

__all__ = ["CLOCK_SLACK_SECONDS", "COPY_SCAN_BLOCKS", "SETTLEMENT_REVERTED", "BroadcastHead", "Permit2Reads", "Permit2Signed",
           "block_since", "copied_settlement", "explain_revert",
           "same_call"]

COPY_SCAN_BLOCKS = 64  # how far back from our receipt a copy is looked for when our broadcast's head is not known
SETTLEMENT_REVERTED = "settlement_reverted"  # reverted, and the chain could not be read to say why
# The proxies' settle arguments: a copy is the same call whatever its encoding (trailing bytes the proxy
# ignores, offsets of its own), so it is compared decoded.
_SETTLE_TYPES = {
    SEL_EXACT_SETTLE: ["((address,uint256),uint256,uint256)", "address", "(address,uint256)", "bytes"],
    SEL_UPTO_SETTLE: ["((address,uint256),uint256,uint256)", "uint256", "address", "(address,address,uint256)", "bytes"],
}


class Permit2Signed(Protocol):
    """What is read of a Permit2 authorization here (``UptoPermit``, ``ExactPermit``)."""

    @property
    def deadline(self) -> int: ...

    def nonce_bitmap_call(self) -> bytes: ...

    def nonce_used(self, bitmap: bytes) -> bool: ...

    def allowance_call(self) -> bytes: ...


class Permit2Reads(Protocol):
    @property
    def settlement_address(self) -> str | None: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...

    async def balance_of(self, token: str, owner: str) -> int: ...

    async def get_logs(self, address: str, topics: list[str | list[str] | None], from_block: int,
                       to_block: int) -> list[dict[str, Any]]: ...

    async def get_receipt(self, tx_hash: str) -> Receipt | None: ...

    async def transaction_of(self, tx_hash: str) -> tuple[str, str, bytes] | None: ...


def same_call(sent: bytes, ours: bytes) -> bool:
    """Whether ``sent`` calls the proxy's ``settle`` with the very arguments of ``ours`` (this permit,
    this owner, this witness, this signature), however it is encoded."""
    if sent == ours:
        return True
    types = _SETTLE_TYPES.get(ours[:4])
    if types is None or sent[:4] != ours[:4]:
        return False
    try:
        return bool(abi_decode(types, sent[4:], strict=False) == abi_decode(types, ours[4:], strict=False))
    except Exception:  # noqa: BLE001 - calldata that does not decode: not this call
        return False


class BroadcastHead:
    """A write-ahead hook (``BeforeSend``) that also reads the chain's head, beside the write-ahead and
    before the broadcast: a copy of our transaction can only be mined after it (``block``; None when
    the node did not say, and the copy is looked for in the ``COPY_SCAN_BLOCKS`` before our receipt)."""

    def __init__(self, chain: HeadReads, before_send: BeforeSend | None) -> None:
        self._chain, self._before_send = chain, before_send
        self.block: int | None = None

    async def __call__(self, tx_hash: str) -> None:
        read = asyncio.ensure_future(self._chain.block_number())
        try:
            if self._before_send is not None:
                await self._before_send(tx_hash)
        except BaseException:
            read.cancel()
            raise
        try:
            head = await read
        except (ChainUnavailable, RpcError):
            return
        self.block = head if self.block is None else min(self.block, head)  # signed again: the first broadcast's


class HeadReads(Protocol):
    async def block_number(self) -> int: ...


async def _transfer_logs(chain: Permit2Reads, token: str, topics: list[str | list[str] | None], up_to_block: int,
                         from_block: int | None) -> list[dict[str, Any]]:
    """The token's matching Transfer logs from ``from_block`` (or ``COPY_SCAN_BLOCKS`` back) to
    ``up_to_block``, read in windows a node that caps ``eth_getLogs`` ranges answers, at most
    ``LOG_SCAN_BLOCKS`` back."""
    start = max(0, up_to_block - COPY_SCAN_BLOCKS if from_block is None else from_block, up_to_block - LOG_SCAN_BLOCKS)
    logs: list[dict[str, Any]] = []
    for low in range(start, up_to_block + 1, LOG_WINDOW_BLOCKS):
        logs += await chain.get_logs(token, topics, low, min(low + LOG_WINDOW_BLOCKS - 1, up_to_block))
    return logs


CLOCK_SLACK_SECONDS = 120  # our host's clock against the chain's, when a row's creation dates a block


async def block_since(chain: Any, up_to_block: int, since: datetime) -> int | None:
    """The first block dated at or after ``since`` less ``CLOCK_SLACK_SECONDS`` (a row's creation: a
    copy of our settlement is mined after our broadcast, which came after it), among the
    ``LOG_SCAN_BLOCKS`` up to ``up_to_block``: bisected on block dates, for an open row read back
    (the resolver, reconcile), whose broadcast head was not kept. None when this chain client cannot
    read a block's date (the ``COPY_SCAN_BLOCKS`` window then)."""
    read = getattr(chain, "block_timestamp", None)  # JsonRpcChain's
    if read is None:
        return None
    moment = (since if since.tzinfo is not None else since.replace(tzinfo=UTC)).timestamp() - CLOCK_SLACK_SECONDS
    low, high = max(0, up_to_block - LOG_SCAN_BLOCKS), up_to_block
    if int(await read(low)) >= moment:
        return low
    while high - low > 1:  # read(low) < moment: the first block at or after it is in (low, high]
        middle = (low + high) // 2
        if int(await read(middle)) >= moment:
            high = middle
        else:
            low = middle
    return high


async def _wrapped_call(chain: Permit2Reads, tx_hash: str, settle_call: tuple[str, bytes]) -> bool:
    """Whether ``tx_hash``, sent to another contract (Multicall3, a bot's wrapper), made our very call
    to the proxy, and that call took effect: read from the node's trace (``JsonRpcChain.traced_calls``);
    False when the node does not trace."""
    read = getattr(chain, "traced_calls", None)
    calls = await read(tx_hash) if read is not None else None
    proxy, calldata = settle_call
    return any(to.lower() == proxy.lower() and same_call(data, calldata) for _, to, data in calls or [])


async def copied_settlement(chain: Permit2Reads, settle_call: tuple[str, bytes], transfer: tuple[str, str, str, int],
                            up_to_block: int, from_block: int | None = None) -> Receipt | None:
    """The receipt of a copy of our settlement: another account's transaction (one of ours has its
    own request to answer for it) that made our very call (``settle_call``: the proxy and our
    calldata, compared decoded; so it executed this permit, whose nonce makes that once), sent to the
    proxy itself or, where the node traces, through another contract (Multicall3, a wrapper: the
    call found in the trace, and taking effect), and that succeeded moving exactly ``transfer``
    (token, payer, payee, amount), mined from ``from_block`` (the head when ours was broadcast: a copy
    comes after it, however long ours waited) to ``up_to_block``, or, with no ``from_block`` (an open
    row read back), in the ``COPY_SCAN_BLOCKS`` before ``up_to_block``; None when there is none. A transfer of the same amount made any other way (the payer's own, with
    this signature pasted in its input and the nonces invalidated) is no copy: it could pay for two
    payments at once."""
    proxy, calldata = settle_call
    token, payer, to, amount = transfer
    topics: list[str | list[str] | None] = ["0x" + TOPIC_TRANSFER.hex(), address_topic(payer), address_topic(to)]
    for log in await _transfer_logs(chain, token, topics, up_to_block, from_block):
        if int(str(log.get("data") or "0x0"), 16) != amount:
            continue
        tx_hash = str(log["transactionHash"])
        sent = await chain.transaction_of(tx_hash)
        if sent is None or sent[0].lower() == (chain.settlement_address or "").lower():
            continue
        if sent[1].lower() == proxy.lower():
            if not same_call(sent[2], calldata):
                continue
        elif not await _wrapped_call(chain, tx_hash, settle_call):
            continue
        receipt = await chain.get_receipt(tx_hash)
        if receipt is not None and receipt.status == 1 and receipt.has_transfer(token, payer, to, amount):
            return receipt
    return None


async def explain_revert(chain: Permit2Reads, permit: Permit2Signed, transfer: tuple[str, str, str, int], receipt: Receipt,
                         reverted: str, settle_call: tuple[str, bytes], sent_at: int | None = None) -> tuple[str, Receipt | None]:
    """Why our Permit2 settlement (mined in ``receipt``, reverted; broadcast with the chain's head at
    ``sent_at``) failed: a reason, and the receipt of the copy that settled this payment instead, if
    one did (the reason is then ``settled_by_copy``)."""
    token, payer, _, amount = transfer
    try:
        if permit.nonce_used(await chain.eth_call(PERMIT2_ADDRESS, permit.nonce_bitmap_call())):
            copy = await copied_settlement(chain, settle_call, transfer, receipt.block_number, sent_at)
            return ("settled_by_copy", copy) if copy is not None else ("permit2_nonce_used", None)
        if await mined_past(chain, receipt.block_number, permit.deadline + 1):  # Permit2: block.timestamp > deadline
            return ERR_PERMIT2_DEADLINE_EXPIRED, None
        if await chain.balance_of(token, payer) < amount:
            return ERR_PERMIT2_INSUFFICIENT_BALANCE, None
        if int.from_bytes((await chain.eth_call(token, permit.allowance_call()))[:32], "big") < amount:
            return ERR_PERMIT2_ALLOWANCE_REQUIRED, None
    except (ChainUnavailable, RpcError):
        return SETTLEMENT_REVERTED, None
    return reverted, None
