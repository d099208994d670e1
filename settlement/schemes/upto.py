"""The ``upto`` scheme on EVM networks: Permit2 witness transfers up to a signed maximum, settled for
the actual amount through the x402 upto proxy (x402 spec ``scheme_upto_evm``; the SDK's
``mechanisms.evm.upto`` is the reference for payloads, checks and reason codes).

The payer approves Permit2 once, then signs per payment a ``PermitWitnessTransferFrom`` with the
proxy as spender, ``permitted.amount`` = the offer's maximum, and the witness {to: payTo,
facilitator: our settlement account, validAfter}. Only that facilitator can settle it, for any
amount in (0, maximum], and only to ``to``.

* ``requirements(terms, maximum)``: an offer whose ``amount`` is the maximum, ``extra`` with the
  token's domain, ``assetTransferMethod: permit2`` and ``facilitatorAddress``.
* ``verify``: offline (spender, token, payTo, facilitator, deadline, validAfter, maximum ==
  requirements.amount, the charge (``extra.charge.amount``) not above it, the payer's ECDSA
  signature when it has no code), then the chain: the nonce
  unused in Permit2's bitmap, allowance and balance ≥ the maximum, and the proxy's ``settle`` at the
  full maximum simulated from our account (which checks a contract wallet's signature too).
* ``settle``: the actual charge is ``extra.charge.amount`` of the gateway's own offer, else
  ``requirements.amount`` (the SDK's convention): more than the maximum is refused, 0 settles nothing; else simulated, then sent with the hash written ahead
  (``before_send``) and judged by its receipt (a Transfer of exactly that amount to payTo).
* ``resolve``: the ledger row's ``authorization`` is the signed payload (so the maximum is on the
  row without a new column) and ``amount`` the charge; the chain says settled (our receipt), used
  elsewhere (nonce spent without it), reverted, pending or never sent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from x402.mechanisms.evm.constants import (
    ERR_PERMIT2_ALLOWANCE_REQUIRED,
    ERR_PERMIT2_DEADLINE_EXPIRED,
    ERR_PERMIT2_INSUFFICIENT_BALANCE,
    ERR_PERMIT2_INVALID_SIGNATURE,
    ERR_PERMIT2_INVALID_SPENDER,
    ERR_PERMIT2_NOT_YET_VALID,
    ERR_PERMIT2_RECIPIENT_MISMATCH,
    ERR_PERMIT2_TOKEN_MISMATCH,
    ERR_UPTO_FACILITATOR_MISMATCH,
    ERR_UPTO_INVALID_SCHEME,
    ERR_UPTO_NETWORK_MISMATCH,
    ERR_UPTO_SETTLEMENT_EXCEEDS_AMOUNT,
    PERMIT2_DEADLINE_BUFFER,
)

from catalog import PaymentTerms, to_atomic
from settlement.chain.client import BeforeSend, Receipt, RpcError
from settlement.chain.deployment import LOCAL_CHAIN_ID, Deployment, DevchainError
from settlement.chain.gas import gas_extra, receipt_shares
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.ledger import Payment, PaymentState
from settlement.ledger.resolve import Resolution
from settlement.schemes.base import Supported
from settlement.schemes.eip712 import recover_signer
from settlement.schemes.exact_guards import PAYER_CODE_REVERTED, STRUCK_MESSAGE, InFlight, in_flight_refusal
from settlement.schemes.exact_resolve import receipt_now, resend_if_forgotten, window_closed
from settlement.schemes.permit2_outcome import BroadcastHead, Permit2Signed, block_since, copied_settlement, explain_revert
from settlement.schemes.upto_permit import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPermit, parse_upto
from settlement.x402.digits import is_digits
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

__all__ = [
    "CHARGE_KEY", "UPTO", "UptoChain", "UptoEvm", "build_upto", "send_permit2_settlement", "upto_charge", "upto_maximum",
    "upto_requirements",
]

UPTO = "upto"
CHARGE_KEY = "charge"  # requirements.extra: how the final amount is computed, and what it is
SETTLE_GAS = 200_000  # the proxy, Permit2's checks and a token transfer (~90k), with room
# Custom errors of Permit2 and the proxy, as the node reports them (hex selectors), to reason codes.
_REVERTS = {
    "0x756688fe": "permit2_nonce_used",  # InvalidNonce()
    "0xcd21db4f": ERR_PERMIT2_DEADLINE_EXPIRED,  # SignatureExpired(uint256)
    "0x815e1d64": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidSigner()
    "0x8baa579f": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidSignature()
    "0xb0669cbc": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidContractSignature()
    "0x0f6fae87": "upto_unauthorized_facilitator",  # UnauthorizedFacilitator()
}


class UptoChain(Protocol):
    """What ``upto`` needs of a network's chain client (``JsonRpcChain`` has it)."""

    chain_id: int

    @property
    def settlement_address(self) -> str | None: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...

    async def get_code(self, address: str) -> bytes: ...

    async def balance_of(self, token: str, owner: str) -> int: ...

    async def send_call(self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = ...) -> str: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...

    async def get_logs(self, address: str, topics: list[str | list[str] | None], from_block: int,
                       to_block: int) -> list[dict[str, Any]]: ...

    async def get_receipt(self, tx_hash: str) -> Receipt | None: ...

    async def block_number(self) -> int: ...

    async def transaction_of(self, tx_hash: str) -> tuple[str, str, bytes] | None: ...


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason, self.message = reason, message


def upto_requirements(terms: PaymentTerms, charge: int, facilitator: str) -> PaymentRequirements:
    """An upto offer: at most the terms' ``maximum`` (``charge`` when they have none) of the token to
    ``pay_to``, settled by ``facilitator``. ``extra.charge`` says what will be charged: the tool's
    price, ``charge`` atomic units, never more than the maximum (``amount``)."""
    maximum = to_atomic(terms.maximum, terms.decimals) if terms.maximum is not None else charge
    return PaymentRequirements(
        scheme=UPTO, network=terms.network, amount=str(maximum), asset=terms.asset, pay_to=terms.pay_to,
        max_timeout_seconds=terms.max_timeout_seconds,
        # A token without an EIP-712 domain (asset_transfer_method: permit2) has no version to name.
        extra={"name": terms.asset_name, **({"version": terms.asset_version} if terms.asset_version else {}),
               "assetTransferMethod": "permit2",
               "facilitatorAddress": facilitator, CHARGE_KEY: {"basis": "price", "amount": str(charge)}},
    )


def upto_charge(requirements: PaymentRequirements) -> int:
    """What an upto settlement charges: the offer's ``extra.charge.amount`` (the gateway's own
    requirements say it), else ``amount`` (the SDK's convention: the requirements of a settle carry
    the actual charge)."""
    charge = (requirements.extra or {}).get(CHARGE_KEY)
    if isinstance(charge, dict) and is_digits(charge.get("amount")):
        return int(charge["amount"])
    return int(requirements.amount)


def upto_maximum(row: Payment) -> int | None:
    """The signed maximum of an upto ledger row (from its stored authorization); None otherwise."""
    try:
        permit = parse_upto(json.loads(row.authorization))
    except ValueError:
        return None
    return permit.maximum if permit is not None else None


class UptoEvm:
    """``upto`` on the networks of ``chains`` (each with a settlement key and Permit2 and the proxy
    at their canonical addresses: the wiring checks the code is there)."""

    name = UPTO

    def __init__(
        self, chains: Mapping[str, UptoChain], *, receipt_timeout: float = 30.0, clock: Callable[[], float] = time.time,
        in_flight: InFlight | None = None,
    ) -> None:
        self._chains = dict(chains)
        self._receipt_timeout = receipt_timeout
        self._clock = clock
        # Each payer's settlements in flight (exact_guards): shared with the exact scheme's, one balance.
        self.in_flight = in_flight if in_flight is not None else InFlight()

    def serves(self, network: str) -> bool:
        return network in self._chains

    def facilitator(self, network: str) -> str:
        address = self._chains[network].settlement_address
        if address is None:
            raise ChainUnavailable(f"no settlement key for {network}", code="settlement_key_missing")
        return address

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        return upto_requirements(terms, amount, self.facilitator(terms.network))

    def writes_ahead(self, network: str) -> bool:
        return self.serves(network)

    def describe(self) -> Supported:
        kinds = [{"x402Version": 2, "scheme": UPTO, "network": n, "extra": {"facilitatorAddress": self.facilitator(n)}}
                 for n in sorted(self._chains)]
        signers = sorted({self.facilitator(n) for n in self._chains})
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": signers} if signers else {}}

    # ------------------------------------------------------------------------------ verify

    def _offline(self, payload: PaymentPayload, requirements: PaymentRequirements) -> UptoPermit:
        """The checks that need no chain; ``_Refused`` names the first that fails."""
        permit = parse_upto(payload.payload)
        if payload.accepted.scheme != UPTO or requirements.scheme != UPTO:
            raise _Refused(ERR_UPTO_INVALID_SCHEME, "this offer is not upto")
        if permit is None:
            raise _Refused("invalid_permit2_payload_format", "the payload is not an upto Permit2 authorization")
        if payload.accepted.network != requirements.network or not self.serves(requirements.network):
            raise _Refused(ERR_UPTO_NETWORK_MISMATCH, f"upto is not settled on {payload.accepted.network}")
        now = int(self._clock())
        checks = (
            (permit.spender == UPTO_PROXY_ADDRESS, ERR_PERMIT2_INVALID_SPENDER, "the spender must be the x402 upto proxy"),
            (permit.token.lower() == requirements.asset.lower(), ERR_PERMIT2_TOKEN_MISMATCH, "another token"),
            (permit.to.lower() == requirements.pay_to.lower(), ERR_PERMIT2_RECIPIENT_MISMATCH, "witness.to is not payTo"),
            (permit.facilitator == self.facilitator(requirements.network), ERR_UPTO_FACILITATOR_MISMATCH,
             "witness.facilitator is not this gateway's facilitatorAddress"),
            (permit.deadline >= now + PERMIT2_DEADLINE_BUFFER, ERR_PERMIT2_DEADLINE_EXPIRED, "the deadline has passed"),
            (permit.valid_after <= now, ERR_PERMIT2_NOT_YET_VALID, "validAfter is in the future"),
        )
        for ok, reason, message in checks:
            if not ok:
                raise _Refused(reason, message)
        return permit

    async def _signature(self, chain: UptoChain, permit: UptoPermit) -> None:
        """An account without code must have signed with ECDSA; a contract wallet's signature is
        left to the simulation (Permit2 asks the wallet, ERC-1271)."""
        if recover_signer(permit.digest(chain.chain_id), permit.signature) == permit.payer:
            return
        if not await chain.get_code(permit.payer):
            raise _Refused(ERR_PERMIT2_INVALID_SIGNATURE, "the signature is not the payer's over this authorization")

    async def _funds(self, chain: UptoChain, permit: UptoPermit, amount: int) -> None:
        if permit.nonce_used(await chain.eth_call(PERMIT2_ADDRESS, permit.nonce_bitmap_call())):
            raise _Refused("permit2_nonce_used", "this authorization's nonce was already used")
        allowance = int.from_bytes((await chain.eth_call(permit.token, permit.allowance_call()))[:32], "big")
        if allowance < amount:
            raise _Refused(ERR_PERMIT2_ALLOWANCE_REQUIRED, "the payer has not approved Permit2 for this amount")
        if await chain.balance_of(permit.token, permit.payer) < amount:
            raise _Refused(ERR_PERMIT2_INSUFFICIENT_BALANCE, "the payer's balance is below the amount")

    async def _simulate(self, chain: UptoChain, permit: UptoPermit, amount: int) -> None:
        try:
            await chain.eth_call(UPTO_PROXY_ADDRESS, permit.settle_calldata(amount), gas=SETTLE_GAS, sender=permit.facilitator)
        except RpcError as exc:
            raise _Refused(_revert_reason(exc.rpc_message), "the settlement would revert") from None

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        payer = str((payload.payload.get("permit2Authorization") or {}).get("from") or "")
        try:
            permit = self._offline(payload, requirements)
            payer = permit.payer
            if permit.maximum != int(requirements.amount):
                raise _Refused("permit2_amount_mismatch", "permitted.amount must be the offer's maximum")
            if upto_charge(requirements) > permit.maximum:  # could never settle: refused before the upstream
                raise _Refused(ERR_UPTO_SETTLEMENT_EXCEEDS_AMOUNT, "the offer's charge is above the signed maximum")
            chain = self._chains[requirements.network]
            if await self.in_flight.struck(requirements.network, permit.payer):
                raise _Refused(PAYER_CODE_REVERTED, STRUCK_MESSAGE)
            await self._signature(chain, permit)
            await self._funds(chain, permit, permit.maximum)
            await self._simulate(chain, permit, permit.maximum)
        except _Refused as refused:
            return VerifyResponse(is_valid=False, invalid_reason=refused.reason, invalid_message=refused.message, payer=payer)
        return VerifyResponse(is_valid=True, payer=payer)

    # ------------------------------------------------------------------------------ settle

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        """Settle the actual charge (``upto_charge``) of the signed maximum."""
        network, amount = requirements.network, upto_charge(requirements)
        try:
            permit = self._offline(payload, requirements)
            if amount > permit.maximum:
                raise _Refused(ERR_UPTO_SETTLEMENT_EXCEEDS_AMOUNT, "the charge is above the signed maximum")
            if amount == 0:
                return SettleResponse(success=True, transaction="", network=network, payer=permit.payer, amount="0")
            chain = self._chains[network]
            await self._simulate(chain, permit, amount)
        except _Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message, network=network)
        return await send_permit2_settlement(
            chain, UPTO_PROXY_ADDRESS, permit.settle_calldata(amount), before_send,
            transfer=(permit.token, permit.payer, permit.to, amount), network=network,
            receipt_timeout=self._receipt_timeout, revert_reason=_revert_reason, reverted="upto_settlement_reverted",
            permit=permit, in_flight=self.in_flight,
        )

    # ------------------------------------------------------------------------------ resolve

    async def resolve(self, row: Payment) -> Resolution | None:
        chain = self._chains.get(row.network)
        try:
            permit = parse_upto(json.loads(row.authorization))
        except ValueError:
            permit = None
        if chain is None or permit is None:
            return None
        return await resolve_upto(row, permit, chain, self._clock)


async def resolve_upto(row: Payment, permit: Permit2Signed, chain: UptoChain, clock: Callable[[], float],
                       settle_call: tuple[str, bytes] | None = None) -> Resolution:
    """What the chain says about an open Permit2 payment (upto, or exact through Permit2). Settled:
    our recorded transaction moved exactly ``row.amount`` from the payer to payTo. The hash is
    always written ahead, so an open row without one was never broadcast."""

    def outcome(after: PaymentState, reason: str, receipt: Receipt | None = None) -> Resolution:
        return Resolution(
            payment_id=row.id, request_id=row.request_id, before=row.state, after=after.value,
            tx_hash=receipt.tx_hash if receipt else row.tx_hash,
            block_number=receipt.block_number if receipt else row.block_number, reason=reason,
        )

    # A receipt read that fails raises (never "not mined": the nonce seen used would then be blamed
    # on another transaction); the deadline is judged by the chain's clock, read before the nonce.
    def moved(receipt: Receipt | None) -> bool:  # our transaction moved exactly this payment
        return receipt is not None and receipt.status == 1 and receipt.has_transfer(row.asset, row.payer, row.pay_to, row.amount)

    receipt = await receipt_now(chain, row.tx_hash) if row.tx_hash else None
    if moved(receipt):
        return outcome(PaymentState.SETTLED, "receipt_success", receipt)
    closed = await window_closed(chain, permit.deadline + 1, clock)  # Permit2: block.timestamp > deadline
    if permit.nonce_used(await chain.eth_call(PERMIT2_ADDRESS, permit.nonce_bitmap_call())):
        if receipt is None and row.tx_hash:  # ours may be what used it, mined since the receipt read
            receipt = await receipt_now(chain, row.tx_hash)
            if moved(receipt):
                return outcome(PaymentState.SETTLED, "receipt_success", receipt)
        up_to = receipt.block_number if receipt is not None else await chain.block_number()  # a copy comes before ours
        copy = None if settle_call is None else await copied_settlement(  # the upto proxy takes only us: no copies
            chain, settle_call, (row.asset, row.payer, row.pay_to, row.amount), up_to,
            await block_since(chain, up_to, row.created_at))  # and after our broadcast, after the row
        if copy is not None:  # a copy of our transaction (the exact proxy takes any sender) moved this very payment
            ours = receipt_shares(receipt, 1) if receipt is not None else None  # our revert's gas stays on the row
            return replace(outcome(PaymentState.SETTLED, "settled_by_copy", copy), gas=ours[0].ledger_fields() if ours else None)
        return outcome(PaymentState.FAILED, "permit_used_elsewhere", receipt)
    if receipt is not None:
        return outcome(PaymentState.FAILED, "transaction_reverted", receipt)
    if not row.tx_hash:
        return outcome(PaymentState.FAILED, "not_broadcast")
    if closed:
        return outcome(PaymentState.FAILED, "authorization_expired_unmined")
    await resend_if_forgotten(chain, row.tx_hash)
    return outcome(PaymentState.PENDING, "transaction_not_mined")


async def send_permit2_settlement(
    chain: UptoChain, proxy: str, calldata: bytes, before_send: BeforeSend | None, *,
    transfer: tuple[str, str, str, int], network: str, receipt_timeout: float,
    revert_reason: Callable[[str], str], reverted: str, permit: Permit2Signed, in_flight: InFlight,
) -> SettleResponse:
    """Send a Permit2 proxy's settlement (upto's, or exact's through Permit2) with its hash written
    ahead (``before_send``), then judge it by its receipt: settled when it moved exactly ``transfer``
    (token, from, to, amount); pending when it was broadcast but is not known final; the gas the
    settlement key paid goes on the ledger row, a revert's too."""
    token, payer, to, amount = transfer
    base: dict[str, Any] = {"payer": payer, "network": network}
    # The simulation before this ran on the latest block: it cannot see this payer's settlements in flight.
    async def mined() -> bool:  # its Permit2 nonce used: the balance read shows it spent
        return permit.nonce_used(await chain.eth_call(PERMIT2_ADDRESS, permit.nonce_bitmap_call()))

    async with in_flight.hold(chain, network, token, payer, amount, mined) as held:
        if not held.covered:
            return in_flight_refusal(payer, network, held.reason if held.reason == PAYER_CODE_REVERTED else ERR_PERMIT2_INSUFFICIENT_BALANCE)
        return held.judged(await _send_and_judge(
            chain, proxy, calldata, before_send, transfer, base, receipt_timeout, revert_reason, reverted, permit))


async def _send_and_judge(
    chain: UptoChain, proxy: str, calldata: bytes, before_send: BeforeSend | None, transfer: tuple[str, str, str, int],
    base: dict[str, Any], receipt_timeout: float, revert_reason: Callable[[str], str], reverted: str, permit: Permit2Signed,
) -> SettleResponse:
    token, payer, to, amount = transfer
    head = BroadcastHead(chain, before_send)  # a copy of ours is looked for from the head at our broadcast on
    try:
        tx_hash = await chain.send_call(proxy, calldata, head, gas=SETTLE_GAS)
    except BroadcastUncertain as exc:
        return _pending(exc.tx_hash, base)
    except RpcError as exc:  # refused outright: nothing was broadcast
        return SettleResponse(success=False, error_reason=revert_reason(exc.rpc_message),
                              error_message="the chain refused the settlement transaction", **base)
    try:
        receipt = await chain.wait_for_receipt(tx_hash, receipt_timeout)
    except ChainUnavailable:
        receipt = None
    if receipt is None:
        return _pending(tx_hash, base)
    shares = receipt_shares(receipt, 1)
    extra = {"blockNumber": receipt.block_number, **gas_extra(shares[0] if shares else None)}
    if receipt.status == 1 and receipt.has_transfer(token, payer, to, amount):
        return SettleResponse(success=True, transaction=receipt.tx_hash, amount=str(amount), extra=extra, **base)
    reason, copy = await explain_revert(chain, permit, transfer, receipt, reverted, (proxy, calldata), head.block)
    if copy is not None:  # settled by a copy of ours: this payment's money moved; our revert's gas stays on the row
        return SettleResponse(success=True, transaction=copy.tx_hash, amount=str(amount),
                              extra={**extra, "blockNumber": copy.block_number}, **base)
    return SettleResponse(success=False, error_reason=reason, extra=extra,
                          error_message="the settlement transaction reverted", transaction=receipt.tx_hash, **base)


def _pending(tx_hash: str, base: dict[str, Any]) -> SettleResponse:
    return SettleResponse(success=False, error_reason="settlement_pending", transaction=tx_hash,
                          error_message="the settlement transaction was broadcast but is not final yet", **base)


def _revert_reason(message: str) -> str:
    lowered = message.lower()
    return next((code for sel, code in _REVERTS.items() if sel in lowered), "upto_settlement_would_revert")



def build_upto(
    chains: Mapping[str, UptoChain], deployment_file: str | os.PathLike[str], *, receipt_timeout: float = 30.0,
    in_flight: InFlight | None = None,
) -> UptoEvm | None:
    """``upto`` on the chains that have its contracts: today the local dev chain whose deployment
    file lists the upto proxy (``x402gw devchain`` places Permit2 and the proxy at their canonical
    addresses). None when no chain has them."""
    try:
        has_contracts = Deployment.read(deployment_file).upto_proxy is not None
    except (DevchainError, UnicodeDecodeError):
        has_contracts = False
    served = {n: c for n, c in chains.items() if has_contracts and c.chain_id == LOCAL_CHAIN_ID}
    return UptoEvm(served, receipt_timeout=receipt_timeout, in_flight=in_flight) if served else None
