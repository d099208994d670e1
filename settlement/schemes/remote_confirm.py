"""A remote facilitator's settle answer, held to the chain where the gateway can read it.

A facilitator is a third party: a stale idempotency cache, a bug or a lie can answer ``success``
with another payment's transaction, with a hash never mined, or ``success: false`` naming a
transaction that did land. Where the gateway has a chain client for the network (``X402GW_RPC``),
an ``exact`` (EIP-3009) settle answer that claims success or names a transaction is checked on
chain before the payment is counted either way:

- the named transaction's receipt shows this very authorization moving the price from the payer
  to payTo (``exact_resolve.moved``): settled, by it;
- otherwise the token says the authorization is used: settled by the transaction that used it if
  that one moved this payment; refused as used otherwise;
- otherwise nothing has moved yet: unknown (``facilitator_settlement_unconfirmed``, pending, 503),
  resolved from the chain like any pending payment; never a success, never a plain 402. A
  failure naming a transaction that is mined without moving anything, and the authorization
  unused, stays the facilitator's refusal.

Without a chain client a failure that names a transaction is unknown too (the facilitator
broadcast something), and a success is taken as the facilitator's word (README: Facilitators).
"""

from __future__ import annotations

import re

from eth_utils import to_checksum_address

from settlement.chain.client import Chain, Receipt, RpcError
from settlement.errors import ChainUnavailable, PaymentDecodeError
from settlement.schemes.exact_resolve import moved, receipt_now
from settlement.schemes.remote import FACILITATOR_UNCONFIRMED as UNCONFIRMED
from settlement.schemes.remote import settlement_outcome_unknown
from settlement.x402.codec import parse_exact_evm
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse

__all__ = ["CONFIRM_RECEIPT_SECONDS", "UNCONFIRMED", "confirm_settlement"]

CONFIRM_RECEIPT_SECONDS = 10.0  # how long a named transaction the node knows is waited for
_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def _unknown(result: SettleResponse, network: str, message: str) -> SettleResponse:
    return SettleResponse(success=False, error_reason=UNCONFIRMED, error_message=message, network=network,
                          transaction=result.transaction if _HASH.fullmatch(result.transaction or "") else "",
                          payer=result.payer)


async def _named_receipt(chain: Chain, tx_hash: str) -> Receipt | None:
    """The receipt of the transaction the facilitator named: now, or after up to
    ``CONFIRM_RECEIPT_SECONDS`` if the node has it in its pool (our node may be a block behind)."""
    if not _HASH.fullmatch(tx_hash):
        return None
    receipt = await receipt_now(chain, tx_hash)
    knows = getattr(chain, "knows_transaction", None)
    if receipt is None and knows is not None and await knows(tx_hash):
        receipt = await chain.wait_for_receipt(tx_hash, CONFIRM_RECEIPT_SECONDS)
    return receipt


async def confirm_settlement(chain: Chain | None, payload: PaymentPayload, requirements: PaymentRequirements,
                             result: SettleResponse) -> SettleResponse:
    """``result`` (a remote facilitator's settle answer) as the chain shows it (module docstring)."""
    network = requirements.network
    unknown = settlement_outcome_unknown(result)
    if not result.success and not result.transaction:
        return result  # a refusal before any broadcast, or an unknown outcome with nothing to read
    if chain is None:
        if result.success or unknown:
            return result
        return _unknown(result, network, "the facilitator refused after broadcasting a transaction: outcome unknown")
    try:
        a = parse_exact_evm(payload).authorization
        payer, nonce = to_checksum_address(a.from_), bytes.fromhex(a.nonce[2:])
    except (PaymentDecodeError, ValueError):
        return result  # not an EIP-3009 payment (Permit2 through a facilitator): not read here
    token, pay_to, amount = requirements.asset, requirements.pay_to, int(requirements.amount)
    try:
        receipt = await _named_receipt(chain, result.transaction or "")
        if receipt is not None and moved(receipt, token, payer, nonce, pay_to, amount):
            return _settled(receipt, result, network, payer, amount)
        if await chain.authorization_state(token, payer, nonce):
            found = await chain.find_authorization_used(token, payer, nonce)
            if found is not None and moved(found, token, payer, nonce, pay_to, amount):
                return _settled(found, result, network, payer, amount)
            return SettleResponse(success=False, error_reason="invalid_exact_evm_nonce_already_used", network=network,
                                  error_message="the authorization was used without paying this offer; nothing "
                                                "was charged for it here", payer=payer)
    except (ChainUnavailable, RpcError):
        return _unknown(result, network, "the chain could not confirm the facilitator's settlement: outcome unknown")
    if (not result.success and receipt is not None) or unknown:
        return result  # mined, moved nothing, the authorization unused: the refusal stands (or stays unknown)
    return _unknown(result, network, "the facilitator's settlement is not on chain (yet): outcome unknown")


def _settled(receipt: Receipt, result: SettleResponse, network: str, payer: str, amount: int) -> SettleResponse:
    extra = {**(result.extra or {}), "blockNumber": receipt.block_number}
    return SettleResponse(success=True, transaction=receipt.tx_hash, network=network, payer=payer, amount=str(amount),
                          extra=extra)
