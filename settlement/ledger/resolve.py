"""Resolve payments whose outcome is not final (``settling``, ``pending``) against the chain.

Runs at gateway start-up, when a payment in such a state is presented again, and from
``x402gw reconcile``. The chain is the truth: the token's ``authorizationState``, the receipt of
the recorded transaction, and the ``AuthorizationUsed`` log of whoever used the authorization.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Set
from dataclasses import asdict, dataclass
from typing import Any

from eth_utils import to_checksum_address

from settlement.chain.client import Chain, Receipt
from settlement.errors import ChainUnavailable
from settlement.ledger.payments import Ledger, Payment, PaymentState


@dataclass(frozen=True, slots=True)
class Resolution:
    payment_id: int
    request_id: str
    before: str
    after: str
    tx_hash: str | None
    block_number: int | None
    reason: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def _settled_by(receipt: Receipt, row: Payment) -> bool:
    # AuthorizationUsed(payer, nonce) ties the receipt to this very authorization: a batch receipt
    # can hold an identical Transfer (same payer, payee and amount) of another of its items.
    return (
        receipt.status == 1
        and receipt.has_authorization_used(row.asset, row.payer, bytes.fromhex(row.nonce[2:]))
        and receipt.has_transfer(row.asset, row.payer, row.pay_to, row.amount)
    )


async def resolve_payment(
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

    if row.tx_hash:
        receipt = await chain.wait_for_receipt(row.tx_hash, 0)
        if receipt is not None and _settled_by(receipt, row):
            return outcome(PaymentState.SETTLED, "receipt_success", receipt)
    used = await chain.authorization_state(token, row.payer, nonce)
    if used:
        receipt = await chain.find_authorization_used(token, row.payer, nonce)
        if receipt is not None and _settled_by(receipt, row):
            return outcome(PaymentState.SETTLED, "authorization_used", receipt)
        return outcome(PaymentState.FAILED, "authorization_used_elsewhere", receipt)
    if row.tx_hash:
        receipt = await chain.wait_for_receipt(row.tx_hash, 0)
        if receipt is not None:  # mined, reverted, and the authorization is still unused
            return outcome(PaymentState.FAILED, "transaction_reverted", receipt)
        if clock() >= row.valid_before:
            return outcome(PaymentState.FAILED, "authorization_expired_unmined")
        return outcome(PaymentState.PENDING, "transaction_not_mined")
    if write_ahead or clock() >= row.valid_before:
        return outcome(PaymentState.FAILED, "not_broadcast")
    return outcome(PaymentState.PENDING, "outcome_unknown")


def apply(ledger: Ledger, resolution: Resolution) -> None:
    """Writes a resolution through the ledger's transitions (a resolved row is ``settling`` or
    ``pending``): ``mark_settled``, ``fail`` or ``mark_pending``."""
    fields: dict[str, Any] = {}
    if resolution.tx_hash:
        fields["tx_hash"] = resolution.tx_hash
    after = resolution.after
    if after == PaymentState.PENDING.value:
        ledger.mark_pending(resolution.payment_id, **fields)
        return
    if resolution.block_number is not None:
        fields["block_number"] = resolution.block_number
    if after == PaymentState.SETTLED.value:
        ledger.mark_settled(resolution.payment_id, **fields)
    elif after == PaymentState.FAILED.value:
        ledger.fail(resolution.payment_id, resolution.reason, **fields)
    else:
        raise ValueError(f"a reconcile does not resolve a payment to {after!r}")


async def resolve_open_payments(
    ledger: Ledger, chains: dict[str, Chain], *, write_ahead: bool | Set[str] = True
) -> list[Resolution]:
    """Resolve every ``settling``/``pending`` row whose network has a chain; apply and report.

    ``write_ahead``: the networks whose facilitator records the transaction hash before it
    broadcasts (the local one), or ``True``/``False`` for every network. On any other network (a
    remote facilitator) an open row without a hash may have been broadcast: it stays open until
    the chain shows its authorization used, or its ``validBefore`` passes.
    """
    results: list[Resolution] = []
    rows = await ledger.run(ledger.open_payments)
    for row in rows:
        chain = chains.get(row.network)
        if chain is None:
            continue
        try:
            writes_ahead = write_ahead if isinstance(write_ahead, bool) else row.network in write_ahead
            resolution = await resolve_payment(row, chain, write_ahead=writes_ahead)
        except ChainUnavailable:
            continue
        if resolution.after != resolution.before or resolution.tx_hash != row.tx_hash:
            await ledger.run(apply, ledger, resolution)
        results.append(resolution)
    return results
