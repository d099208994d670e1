"""How the exact scheme (EIP-3009) tells what happened to an open payment: the chain is the truth.

The token's ``authorizationState``, the receipt of the recorded transaction, and the
``AuthorizationUsed`` log of whoever used the authorization. The answer is a
``settlement.ledger.resolve.Resolution``; the ledger applies it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from eth_utils import to_checksum_address

from settlement.chain.client import Chain, Receipt
from settlement.ledger import Payment, PaymentState
from settlement.ledger.resolve import Resolution


def moved(receipt: Receipt, token: str, payer: str, nonce: bytes, pay_to: str, amount: int) -> bool:
    """``receipt`` used (payer, nonce) and, under that very authorization, moved ``amount`` from the
    payer to ``pay_to`` (``Receipt.moved_under``: the Transfer right after its AuthorizationUsed; a
    batch receipt, or a payer's own multicall, can hold an identical Transfer of another authorization)."""
    return receipt.status == 1 and receipt.moved_under(token, payer, nonce, pay_to, amount)


def settled_by(receipt: Receipt, row: Payment) -> bool:
    return moved(receipt, row.asset, row.payer, bytes.fromhex(row.nonce[2:]), row.pay_to, row.amount)


async def settled_elsewhere(
    chain: Chain, token: str, payer: str, nonce: bytes, pay_to: str, amount: int
) -> Receipt | None:
    """Our settlement failed because (payer, nonce) is used: the receipt of the transaction that used
    it, when that one moved ``amount`` from the payer to ``pay_to`` under this very authorization.
    The payment is then settled, by whoever sent it (a third party that copied the signed
    authorization from our pending transaction, or the payer itself): the money reached our payee.
    None when the authorization was used otherwise (another transfer under that nonce, or
    cancelled), or by a transaction of our own settlement account (another payment of ours under
    that nonce, which got that answer). Whoever sent it, through whatever contract: a copy cannot be
    told from another gateway of the same payee that the payer presented the authorization to too,
    and a griefer can make any contract emit any event; gateways that sell on one payTo share their
    store and ledger (README).
    ``ChainUnavailable`` when the chain cannot say: the outcome is then unknown, never a refusal."""
    receipt = await chain.find_authorization_used(token, payer, nonce)
    if receipt is None or not moved(receipt, token, payer, nonce, pay_to, amount):
        return None
    ours = getattr(chain, "settlement_address", None)
    if isinstance(ours, str) and receipt.sender is not None and receipt.sender.lower() == ours.lower():
        return None
    return receipt


async def receipt_now(chain: Any, tx_hash: str) -> Receipt | None:
    """Our transaction's receipt as the node has it now; None only when the node says it is not
    mined, ``ChainUnavailable`` when it does not answer. ``wait_for_receipt(tx, 0)`` takes a lookup
    that failed for "not mined yet" (right for a waiter, who asks again): a resolution that then
    sees the nonce used would blame another transaction for what ours did."""
    get = getattr(chain, "get_receipt", None)  # JsonRpcChain's; a test double may only wait
    if get is None:
        receipt: Receipt | None = await chain.wait_for_receipt(tx_hash, 0)
        return receipt
    return await get(tx_hash)  # type: ignore[no-any-return]


async def chain_time(chain: Any) -> int | None:
    """The latest block's timestamp: the clock the token judges an authorization's window by. None
    when this chain client cannot say (a test double): the caller's own clock then stands in."""
    read = getattr(chain, "block_timestamp", None)  # JsonRpcChain's
    return None if read is None else int(await read())


async def mined_past(chain: Any, block_number: int, refused_from: int) -> bool:
    """Whether block ``block_number`` is dated ``refused_from`` or later (its transaction was judged out
    of its window); False when this chain client cannot say."""
    read = getattr(chain, "block_timestamp", None)  # JsonRpcChain's
    return read is not None and int(await read(block_number)) >= refused_from


async def traced_revert(chain: Any, tx_hash: str) -> str:
    """The node's own account of why ``tx_hash`` reverted (``JsonRpcChain.traced_revert``); "" when it
    does not trace (many providers do not) or this chain client cannot ask."""
    read = getattr(chain, "traced_revert", None)
    return (await read(tx_hash) or "") if read is not None else ""


async def resend_if_forgotten(chain: Any, tx_hash: str) -> None:
    """A transaction not mined yet, sent again if the node dropped it and this process signed it
    (``JsonRpcChain.resend_if_forgotten``; a chain client without it: nothing to do)."""
    resend = getattr(chain, "resend_if_forgotten", None)
    if resend is not None:
        await resend(tx_hash)


async def window_closed(chain: Any, refused_from: int, clock: Callable[[], float]) -> bool:
    """Whether no block can take the authorization any more: the token refuses it in a block dated
    ``refused_from`` or later (EIP-3009: ``block.timestamp >= validBefore``; Permit2: ``>
    deadline``). Our clock is not the chain's: a head dated behind it (a slow or stalled chain, a
    skewed host) still takes our transaction from the pool, or sent again by our chain client. So
    our clock first (no read while the window is open by it), then the latest block's date. Read
    before the authorization's state: unused as of a later read, it can never move."""
    if clock() < refused_from:
        return False
    head = await chain_time(chain)
    return head is None or head >= refused_from


async def resolve_exact(
    row: Payment, chain: Chain, *, write_ahead: bool = True, clock: Callable[[], float] = time.time
) -> Resolution:
    """What the chain says about one open payment (the ledger is not touched here).

    ``write_ahead``: the facilitator recorded the transaction hash before broadcasting, so an
    open row without a hash was never broadcast by us.
    """
    nonce = bytes.fromhex(row.nonce[2:])
    token = to_checksum_address(row.asset)

    def outcome(after: PaymentState, reason: str, receipt: Receipt | None = None) -> Resolution:
        return Resolution(
            payment_id=row.id,
            request_id=row.request_id,
            before=row.state,
            after=after.value,
            tx_hash=receipt.tx_hash if receipt else row.tx_hash,
            block_number=receipt.block_number if receipt else row.block_number,
            reason=reason,
        )

    # One receipt read, and the authorization's state read after it: whatever the chain did between
    # two reads (our transaction mined, a copy or a cancel landing) is never mistaken for what it
    # did before them. A receipt read again after the state read could show a transaction mined in
    # between (success included) as "reverted while the authorization was unused".
    # A receipt read that fails is not "not mined" (``receipt_now``). The window is judged by the
    # chain's clock, read before the state (``window_closed``).
    receipt = await receipt_now(chain, row.tx_hash) if row.tx_hash else None
    if receipt is not None and settled_by(receipt, row):
        return outcome(PaymentState.SETTLED, "receipt_success", receipt)
    closed = await window_closed(chain, row.valid_before, clock)
    used = await chain.authorization_state(token, row.payer, nonce)
    if used:
        found = await chain.find_authorization_used(token, row.payer, nonce)
        if found is not None and settled_by(found, row):
            return outcome(PaymentState.SETTLED, "authorization_used", found)
        if found is not None and not found.has_authorization_used(token, row.payer, nonce):
            return outcome(PaymentState.FAILED, "authorization_canceled", receipt)  # the payer's cancel: nothing moved
        return outcome(PaymentState.FAILED, "authorization_used_elsewhere", found or receipt)
    if receipt is not None:  # mined before the state read without moving it, and the authorization unused
        return outcome(PaymentState.FAILED, "transaction_reverted", receipt)
    if row.tx_hash:
        if closed:  # unused as of a block after the chain's clock passed its window: it can never move
            return outcome(PaymentState.FAILED, "authorization_expired_unmined")
        await resend_if_forgotten(chain, row.tx_hash)
        return outcome(PaymentState.PENDING, "transaction_not_mined")
    if write_ahead or closed:
        return outcome(PaymentState.FAILED, "not_broadcast")
    return outcome(PaymentState.PENDING, "outcome_unknown")
