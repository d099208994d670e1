"""The x402 ``batch-settlement`` scheme on EVM networks: one deposit into an escrow channel, a
cumulative voucher per call checked off chain, many calls claimed in one transaction (x402 spec
``scheme_batch_settlement_evm``; the SDK's ``mechanisms.evm.batch_settlement`` gives the payload
types, channel id, typed data, reason codes and the claim signature).

* ``requirements``: ``amount`` is the call's price; ``extra`` {receiverAuthorizer (our settlement
  account, which signs claims), withdrawDelay, name, version, assetTransferMethod: eip3009,
  minDeposit (price × ``ChannelPolicy.deposit_calls``)}.
* ``verify`` (no lock, no writes): the channel is this offer's (payTo, token, receiverAuthorizer,
  withdrawDelay), its id is its config's, the voucher is the payer's authorizer's; a deposit's
  ERC-3009 signature is the payer's and its deposit would go through (simulated); then the voucher
  against the channel: cumulative strictly above what is charged, exactly the charge plus this
  price, within the deposit, no withdrawal pending.
* ``settle`` accepts the voucher, one call at a time per channel across replicas: under the
  channel's lock in the shared store it makes the deposit (once, the seller paying its gas), checks
  the voucher again against the store's charged total and the chain, and advances the total. The
  call's ledger row stays ``settling`` (accrued; ``begin_settlement`` wrote the voucher and the
  answer ahead) until a claim lands (``channels_claims.Claimer``), which settles it with the
  claim's transaction. The answer is ``success`` with no transaction and ``extra`` {chargedAmount,
  channelState, accrued: true} (what the SDK client books its channel by).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from x402.mechanisms.evm.batch_settlement import errors as E
from x402.mechanisms.evm.batch_settlement.constants import MAX_WITHDRAW_DELAY, MIN_WITHDRAW_DELAY

from catalog import PaymentTerms
from settlement.chain.client import BeforeSend, Receipt, RpcError
from settlement.chain.deployment import LOCAL_CHAIN_ID, Deployment, DevchainError
from settlement.errors import ChainUnavailable
from settlement.ledger import Payment
from settlement.ledger.resolve import Resolution
from settlement.schemes.base import Supported
from settlement.schemes.channels_contract import (
    ESCROW_ADDRESS,
    ChannelPayment,
    decode_channel_state,
    exact_view,
    parse_channel,
)
from settlement.schemes.channels_policy import (
    ACCRUED_KEY,
    BATCH,
    ERR_CHANNEL_CLOSED,
    ERR_CHANNEL_WITHDRAWING,
    ERR_CUMULATIVE_NOT_INCREASING,
    ERR_PAYER_HAS_CODE,
    ERR_REFUND_TOO_EARLY,
    LOCK_TTL_MS,
    VOUCHER_ACCEPTED,
    ChainView,
    ChannelChain,
    ChannelPolicy,
    ChannelStore,
    Refused,
    accrued,
    make_deposit,
    signed_by_code,
    simulate_deposit,
)
from settlement.schemes.eip712 import recover_signer
from settlement.schemes.exact_guards import InFlight
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

__all__ = [
    "ACCRUED_KEY", "BATCH", "VOUCHER_ACCEPTED", "ChannelChain", "ChannelPolicy", "ChannelStore", "ChannelsEvm", "accrued", "build_channels", "channel_view", "row_payment",
]

class ChannelsEvm:
    """``batch-settlement`` on the networks of ``chains`` (each with a settlement key, which is the
    channels' receiverAuthorizer, and the escrow at its canonical address). ``bind`` hands it the
    shared store and the ledger (the composition root has them after the schemes)."""

    name = BATCH

    def __init__(self, chains: Mapping[str, ChannelChain], policy: ChannelPolicy | None = None, *,
                 receipt_timeout: float = 30.0, clock: Callable[[], float] = time.time, in_flight: InFlight | None = None) -> None:
        self._chains = dict(chains)
        self.in_flight = in_flight if in_flight is not None else InFlight()  # the exact scheme's: one balance
        self.policy = policy or ChannelPolicy()
        self._receipt_timeout = receipt_timeout
        self._clock = clock
        self._store: ChannelStore | None = None
        self.on_accepted: Callable[[str], Any] | None = None  # the claimer's count (channels_claims)
        self.closer: Callable[[str, ChannelPayment, int, int], Awaitable[Receipt | None]] | None = None  # its close

    def bind(self, store: ChannelStore) -> None:
        self._store = store

    @property
    def networks(self) -> list[str]:
        return sorted(self._chains)

    def chain(self, network: str) -> ChannelChain:
        return self._chains[network]

    def serves(self, network: str) -> bool:
        return network in self._chains

    def authorizer(self, network: str) -> str:
        address = self._chains[network].settlement_address
        if address is None:
            raise ChainUnavailable(f"no settlement key for {network}", code="settlement_key_missing")
        return address

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=BATCH, network=terms.network, amount=str(amount), asset=terms.asset, pay_to=terms.pay_to,
            max_timeout_seconds=terms.max_timeout_seconds,
            extra={"receiverAuthorizer": self.authorizer(terms.network), "withdrawDelay": self.policy.withdraw_delay,
                   "name": terms.asset_name, "version": terms.asset_version, "assetTransferMethod": "eip3009",
                   "minDeposit": str(amount * self.policy.deposit_calls)},
        )

    def writes_ahead(self, network: str) -> bool:
        return False  # the row is `settling` before a voucher is accepted; claims record their hash

    def describe(self) -> Supported:
        kinds = [{"x402Version": 2, "scheme": BATCH, "network": n, "extra": {"receiverAuthorizer": self.authorizer(n)}}
                 for n in self.networks]
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": sorted({self.authorizer(n) for n in self._chains})}}

    # ------------------------------------------------------------------------------ checks

    def offline(self, payload: PaymentPayload, requirements: PaymentRequirements, *, refund: bool = False) -> ChannelPayment:
        """The checks that need no chain and no state; ``Refused`` names the first that fails.
        ``refund``: the payload must be a refund request (else: a deposit or a voucher)."""
        if payload.accepted.scheme != BATCH or requirements.scheme != BATCH:
            raise Refused(E.ERR_INVALID_SCHEME, "this offer is not batch-settlement")
        if payload.accepted.network != requirements.network or not self.serves(requirements.network):
            raise Refused(E.ERR_NETWORK_MISMATCH, f"batch-settlement is not settled on {payload.accepted.network}")
        payment = parse_channel(payload.payload)
        if payment is None or (payment.refund is not None) != refund:
            raise Refused(E.ERR_INVALID_PAYLOAD_TYPE, "the payload is not a batch-settlement deposit or voucher")
        chain_id, config = self._chains[requirements.network].chain_id, payment.config
        checks = (
            (payment.bound(chain_id), E.ERR_CHANNEL_ID_MISMATCH, "voucher.channelId is not the id of channelConfig"),
            (config.receiver.lower() == requirements.pay_to.lower(), E.ERR_RECEIVER_MISMATCH, "the channel pays another receiver"),
            (config.token.lower() == requirements.asset.lower(), E.ERR_TOKEN_MISMATCH, "the channel holds another token"),
            (config.receiver_authorizer.lower() == self.authorizer(requirements.network).lower(),
             E.ERR_RECEIVER_AUTHORIZER_MISMATCH, "the channel's receiverAuthorizer is not this gateway's"),
            (MIN_WITHDRAW_DELAY <= int(config.withdraw_delay) <= MAX_WITHDRAW_DELAY
             and int(config.withdraw_delay) == self.policy.withdraw_delay,
             E.ERR_WITHDRAW_DELAY_MISMATCH, "the channel's withdrawDelay is not the offer's"),
        )
        for ok, reason, message in checks:
            if not ok:
                raise Refused(reason, message)
        signer = recover_signer(payment.voucher_digest(chain_id), _hex(payment.signature))
        if signer != payment.voucher_signer:
            raise Refused(E.ERR_INVALID_VOUCHER_SIGNATURE, "the voucher is not signed by the channel's payer authorizer")
        if payment.deposit is not None:
            extra = requirements.extra or {}
            digest = payment.deposit_digest(chain_id, str(extra.get("name")), str(extra.get("version")))
            if recover_signer(digest, _hex(payment.deposit.signature)) != payment.payer:
                raise Refused(E.ERR_INVALID_RECEIVE_AUTHORIZATION_SIGNATURE, "the deposit is not signed by the payer")
            if payment.deposit.valid_before <= self._clock() + 6:
                raise Refused(E.ERR_VALID_BEFORE_EXPIRED, "the deposit authorization has expired")
            if payment.deposit.amount < (floor := int(requirements.amount) * self.policy.min_deposit_calls):
                raise Refused(E.ERR_DEPOSIT_BELOW_MIN_DEPOSIT, f"a deposit must be at least {floor} ({extra.get('minDeposit')} suggested)")
        return payment

    async def chain_view(self, chain: ChannelChain, payment: ChannelPayment) -> ChainView:
        try:
            channels, pending = payment.state_calls()
            view = decode_channel_state(await chain.eth_call(ESCROW_ADDRESS, channels),
                                        await chain.eth_call(ESCROW_ADDRESS, pending))
        except RpcError as exc:
            raise ChainUnavailable("the channel's state cannot be read", code="chain_unavailable") from exc
        return ChainView(*view)

    async def deposit_pending(self, chain: ChannelChain, payment: ChannelPayment) -> bool:
        """A deposit in the payload whose authorization the token has not used yet."""
        if payment.deposit is None:
            return False
        used = await chain.eth_call(payment.config.token, payment.deposit_used_call())
        return not int.from_bytes(used[:32], "big")

    def check_voucher(self, payment: ChannelPayment, price: int, charged: int, balance: int, view: ChainView) -> None:
        if view.withdrawing:
            raise Refused(ERR_CHANNEL_WITHDRAWING, "the payer has asked to withdraw this channel's deposit")
        if balance == 0:
            raise Refused(E.ERR_CHANNEL_NOT_FOUND, "this channel holds no deposit; open it with a deposit")
        if balance <= view.claimed:  # refunded, withdrawn or used up: nothing unclaimed is left
            raise Refused(ERR_CHANNEL_CLOSED, "this channel has nothing left unclaimed; deposit again to go on")
        if payment.max_claimable <= charged:
            raise Refused(ERR_CUMULATIVE_NOT_INCREASING,
                          f"the voucher's cumulative amount must rise above {charged}, what is charged so far")
        if payment.max_claimable != charged + price:
            raise Refused(E.ERR_CUMULATIVE_AMOUNT_MISMATCH,
                          f"the voucher's cumulative amount must be {charged + price}: charged so far plus this price")
        if payment.max_claimable > balance:
            raise Refused(E.ERR_CUMULATIVE_EXCEEDS_BALANCE, f"the voucher's cumulative amount is above the deposit ({balance})")

    async def charged(self, network: str, payment: ChannelPayment, view: ChainView) -> int:
        """What this channel has charged so far: the shared store's total, else (a store that lost
        it, or a new channel) what the chain has claimed."""
        raw = await self._bound_store().get(_state_key(network, payment.channel_id))
        if raw is None:
            return view.claimed
        record = json.loads(raw)
        if record.get("unclaimable"):  # its claim would revert (channels_claims.Claimer._would_land): no more calls
            raise Refused(E.ERR_CLAIM_SIMULATION_FAILED, "this channel's claim would revert (its payer's account "
                          "refuses its own vouchers): it takes no more calls")
        return max(int(record["charged"]), view.claimed)

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        payer = str(((payload.payload.get("channelConfig") or {}) if isinstance(payload.payload, dict) else {}).get("payer") or "")
        try:
            payment = self.offline(payload, requirements)
            payer = payment.payer
            chain = self._chains[requirements.network]
            await self._signer_is_key(chain, payment)
            view = await self.chain_view(chain, payment)
            balance = view.balance
            if await self.deposit_pending(chain, payment):
                await simulate_deposit(chain, payment)
                assert payment.deposit is not None
                balance += payment.deposit.amount
            self.check_voucher(payment, int(requirements.amount), await self.charged(requirements.network, payment, view),
                               balance, view)
        except Refused as refused:
            return VerifyResponse(is_valid=False, invalid_reason=refused.reason, invalid_message=refused.message, payer=payer)
        return VerifyResponse(is_valid=True, payer=payer)

    @staticmethod
    async def _signer_is_key(chain: ChannelChain, payment: ChannelPayment) -> None:
        """Vouchers are recovered here with ECDSA; the escrow checks a payer with code (and no
        payerAuthorizer) through that code instead (ERC-1271), which may refuse what we accepted:
        calls served until a claim fails. Such a channel takes no more vouchers (a payerAuthorizer works)."""
        if await signed_by_code(chain, payment):
            raise Refused(ERR_PAYER_HAS_CODE, "the payer has code, which the escrow would ask about each voucher; "
                                              "open a channel with a payerAuthorizer key")

    # ------------------------------------------------------------------------------ settle

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        """Accept this call's voucher (one at a time per channel, across replicas)."""
        network, price = requirements.network, int(requirements.amount)
        store, owner = self._bound_store(), uuid.uuid4().hex
        try:
            payment = self.offline(payload, requirements)
        except Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message, network=network)
        lock = _lock_key(network, payment.channel_id)
        if not await store.acquire(lock, owner, LOCK_TTL_MS):
            return SettleResponse(success=False, error_reason=E.ERR_CHANNEL_BUSY, network=network, payer=payment.payer,
                                  error_message="another call on this channel is being accepted; sign again")
        try:
            state = await self._accept(payment, price, network)
        except Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message,
                                  network=network, payer=payment.payer)
        finally:
            await store.release(lock, owner)
        if self.on_accepted is not None:
            await self.on_accepted(network)
        return SettleResponse(success=True, transaction="", network=network, payer=payment.payer, amount=str(price),
                              extra={"chargedAmount": str(price), "channelState": state, ACCRUED_KEY: True})

    async def _accept(self, payment: ChannelPayment, price: int, network: str) -> dict[str, Any]:
        chain = self._chains[network]
        await self._signer_is_key(chain, payment)
        view = await self.chain_view(chain, payment)
        charged = await self.charged(network, payment, view)
        balance = view.balance
        deposit = await self.deposit_pending(chain, payment)
        if deposit:
            assert payment.deposit is not None
            self.check_voucher(payment, price, charged, balance + payment.deposit.amount, view)
            await make_deposit(chain, payment, network, self.in_flight, self._receipt_timeout)
            balance += payment.deposit.amount
        self.check_voucher(payment, price, charged, balance, view)
        await self._bound_store().put(_state_key(network, payment.channel_id),
                                      json.dumps({"charged": str(payment.max_claimable)}).encode())
        return {"channelId": payment.channel_id, "balance": str(balance), "totalClaimed": str(view.claimed),
                "withdrawRequestedAt": view.withdrawing, "chargedCumulativeAmount": str(payment.max_claimable)}

    def _bound_store(self) -> ChannelStore:
        if self._store is None:
            raise ChainUnavailable("batch-settlement has no shared store bound", code="settlement_unavailable")
        return self._store

    async def refund_request(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        """A payer's cooperative refund (a ``refund`` payload: its voucher at what is charged so far,
        signed by its authorizer): under the channel's lock (no voucher is accepted meanwhile) what
        is accrued is claimed, then everything not claimed goes back to the payer (whatever amount
        the request names: it is not signed). Nothing is bought: no ledger row; the answer says what
        was refunded."""
        network, store, owner = requirements.network, self._bound_store(), uuid.uuid4().hex
        try:
            payment = self.offline(payload, requirements, refund=True)
        except Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message, network=network)
        lock = _lock_key(network, payment.channel_id)
        if self.closer is None or not await store.acquire(lock, owner, LOCK_TTL_MS):
            return SettleResponse(success=False, error_reason=E.ERR_CHANNEL_BUSY, network=network, payer=payment.payer,
                                  error_message="the channel is busy; ask again")
        try:
            chain = self._chains[network]
            view = await self.chain_view(chain, payment)
            charged = await self.charged(network, payment, view)
            if payment.max_claimable != charged:
                raise Refused(E.ERR_CUMULATIVE_AMOUNT_MISMATCH, f"a refund's voucher is at what is charged so far ({charged})")
            if view.balance <= charged:
                raise Refused(E.ERR_REFUND_NO_BALANCE, "nothing is left in this channel to refund")
            if charged < (earned := int(requirements.amount) * self.policy.min_deposit_calls):  # its claim and refund: our gas
                raise Refused(ERR_REFUND_TOO_EARLY, f"a cooperative refund comes after {earned} is charged; before, "
                              "withdraw through the escrow (requestWithdrawal, then withdraw after withdrawDelay)")
            # Never before what is charged is claimed on chain (the closer checks): the escrow refunds all it holds
            # unclaimed. Always all of it: the amount asked is not signed, and the voucher at what is charged is public
            # once a claim lands (its calldata), so anyone could otherwise buy a refund transaction per request.
            receipt = await self.closer(network, payment, 2**128 - 1, charged)
            if receipt is None or receipt.status != 1:
                raise Refused(E.ERR_REFUND_TRANSACTION_FAILED, "the refund did not go through (the calls already "
                              "served could not be claimed first, or the refund failed): nothing was refunded")
            after = await self.chain_view(chain, payment)
        except Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message,
                                  network=network, payer=payment.payer)
        finally:
            await store.release(lock, owner)
        refunded = view.balance - after.balance
        state = {"channelId": payment.channel_id, "balance": str(after.balance), "totalClaimed": str(after.claimed),
                 "withdrawRequestedAt": after.withdrawing, "chargedCumulativeAmount": str(charged)}
        return SettleResponse(success=True, transaction=receipt.tx_hash, network=network, payer=payment.payer,
                              amount=str(refunded), extra={"refundedAmount": str(refunded), "channelState": state})

    # ------------------------------------------------------------------------------ resolve

    async def resolve(self, row: Payment) -> Resolution | None:
        """An open channel row with a claim transaction that landed is settled by it. One whose
        voucher the channel has accepted (at or below the store's charged total) stays open, said
        ``voucher_accepted``: its answer is paid for and a resend may have it. Anything else (its
        claim not final, or no store bound) is the claimer's to claim or resolve, so None here."""
        chain, payment = self._chains.get(row.network), row_payment(row)
        if chain is None or payment is None:
            return None
        receipt = await chain.wait_for_receipt(row.tx_hash, 0) if row.tx_hash else None
        if receipt is not None and receipt.status == 1:
            return Resolution(payment_id=row.id, request_id=row.request_id, before=row.state, after="settled",
                              tx_hash=receipt.tx_hash, block_number=receipt.block_number, reason="claim_landed")
        raw = await self._store.get(_state_key(row.network, payment.channel_id)) if self._store is not None else None
        if raw is None or payment.max_claimable > int(json.loads(raw)["charged"]):
            return None
        return Resolution(payment_id=row.id, request_id=row.request_id, before=row.state, after=row.state,
                          tx_hash=row.tx_hash, block_number=row.block_number, reason=VOUCHER_ACCEPTED)


def _payload(row: Payment) -> dict[str, Any]:
    try:
        value = json.loads(row.authorization)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def row_payment(row: Payment) -> ChannelPayment | None:
    """The channel payment a ledger row recorded (its ``authorization`` is the signed payload)."""
    return parse_channel(_payload(row))


def _hex(value: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        return b""


def _state_key(network: str, channel_id: str) -> str:
    return f"chan:{network}:{channel_id}"


def _lock_key(network: str, channel_id: str) -> str:
    return f"chanlock:{network}:{channel_id}"


def channel_view(row: Payment) -> ExactEvmPayload | None:
    """A batch-settlement row's payment as the pipeline keys it (``channels_contract.exact_view``)."""
    payment = row_payment(row)
    return exact_view(payment) if payment is not None else None


def build_channels(chains: Mapping[str, ChannelChain], deployment_file: str | os.PathLike[str],
                   policy: ChannelPolicy | None = None, *, receipt_timeout: float = 30.0,
                   in_flight: InFlight | None = None) -> ChannelsEvm | None:
    """``batch-settlement`` on the chains that have the escrow: today the local dev chain whose
    deployment file lists it (``x402gw devchain`` places it at its canonical address). None when
    no chain has it."""
    try:
        has_escrow = Deployment.read(deployment_file).channel_escrow is not None
    except (DevchainError, UnicodeDecodeError):
        has_escrow = False
    served = {n: c for n, c in chains.items() if has_escrow and c.chain_id == LOCAL_CHAIN_ID}
    return ChannelsEvm(served, policy, receipt_timeout=receipt_timeout, in_flight=in_flight) if served else None
