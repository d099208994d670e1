"""The exact scheme's local, in-process facilitator (EIP-3009 on EVM chains).

It verifies EIP-3009 payments itself (EIP-712 digest + coincurve recovery,
recipient, exact amount, time window, nonce unused and balance read from the chain) and settles
them with ``transferWithAuthorization`` through ``settlement.chain.client``. With ``wallets``, a
signature that is not ``from``'s own ECDSA one is checked as a contract wallet's (ERC-1271 /
ERC-6492, ``settlement.schemes.wallets``: one gas-capped eth_call) and settled through the
``bytes`` overload, an undeployed wallet deployed through its allow-listed factory first. Expected payment failures are
values with the reference SDK's reason codes; broken infrastructure raises ``ChainUnavailable``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from settlement.chain.addresses import checksum_address
from settlement.chain.client import BeforeSend, Chain, Receipt
from settlement.chain.gas import GasShare, gas_extra, receipt_shares
from settlement.chain.head_clock import HeadClock
from settlement.chain.networks import eip155_chain_id
from settlement.errors import BroadcastUncertain, ChainUnavailable, PaymentDecodeError
from settlement.schemes.eip712 import TransferAuthorization, authorization_digest, domain_separator, recover_signer
from settlement.schemes.exact_guards import (
    INSUFFICIENT_BALANCE,
    PAYER_CODE_REVERTED,
    STRUCK_MESSAGE,
    InFlight,
    Mined,
    in_flight_refusal,
    revert_reason_code,
    transfer_refusal,
)
from settlement.schemes.exact_resolve import mined_past, settled_elsewhere, traced_revert
from settlement.schemes.permit2_outcome import SETTLEMENT_REVERTED
from settlement.schemes.wallets import WalletRefused, WalletSignature, WalletSignatures, deploy_wallet
from settlement.x402.codec import parse_exact_evm
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

# A client clock a little behind ours must not make a fresh authorization look expired, and an
# authorization about to expire must not be broadcast: the reference facilitator keeps 6 s.
VALID_BEFORE_MARGIN_SECONDS = 6
# Accept validBefore up to maxTimeoutSeconds plus this much ahead: a far-future authorization is
# a standing cheque we do not want to hold.
VALID_BEFORE_SLACK_SECONDS = 600
# Recovered signers remembered between a payment's verify and its settle (least recently used
# dropped first). Only signatures that recovered to authorization.from are remembered.
SIGNER_CACHE_SIZE = 4096
# EIP-712 domain separators remembered per (network, asset, name, version), least recently used
# dropped first; a domain is remembered only once a signature over it has checked out.
DOMAIN_CACHE_SIZE = 1024
# extra.name / extra.version are caller data: real tokens use a few characters ("USD Coin", "2").
MAX_DOMAIN_FIELD_CHARS = 128


@dataclass(frozen=True, slots=True)
class CheckedPayment:
    """A payload that passed the offline checks, in integers, with its recovered payer."""

    payer: str
    token: str
    auth: TransferAuthorization
    signature: bytes
    # A contract wallet's signature, not yet confirmed on chain (``confirm_wallet``); None: an EOA's.
    wallet: WalletSignature | None = None
    digest: bytes = b""


class Rejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def _gather(used: Awaitable[bool], balance: Awaitable[int], code: Awaitable[bytes]) -> tuple[bool, int, bytes]:
    """The reads, concurrently; the first failure is raised once all have finished (no stray task)."""
    results = await asyncio.gather(used, balance, code, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return bool(results[0]), int(results[1]), bytes(results[2])  # type: ignore[arg-type]


def _put_bounded(cache: OrderedDict[Any, Any], key: Any, value: Any, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _domain_fields(requirements: PaymentRequirements) -> tuple[str, str]:
    """The token's EIP-712 name and version from the requirements' extra, bounded in length."""
    extra = requirements.extra or {}
    name, version = extra.get("name"), extra.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise Rejected("missing_eip712_domain", "requirements lack extra.name / extra.version")
    if len(name) > MAX_DOMAIN_FIELD_CHARS or len(version) > MAX_DOMAIN_FIELD_CHARS:
        raise Rejected(
            "invalid_eip712_domain",
            f"extra.name and extra.version are limited to {MAX_DOMAIN_FIELD_CHARS} characters",
        )
    return name, version


class LocalFacilitator:
    def __init__(
        self,
        chains: Mapping[str, Chain],
        *,
        receipt_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        wallets: WalletSignatures | None = None,
        chain_clocks: Mapping[str, HeadClock] | None = None,
    ) -> None:
        self._chains = chains
        self._wallets = wallets
        self._receipt_timeout = receipt_timeout
        self._clock = clock
        self._chain_clocks = dict(chain_clocks or {})  # a window is judged by a chain's clock where it is ahead
        # each payer's settlements in flight (exact_guards: one balance signed over N times)
        self.in_flight = InFlight(ttl_ms=InFlight.ttl_for(receipt_timeout))
        # Both caches are keyed on caller data, so both are bounded and filled only after the
        # signature recovered to authorization.from (THREATS.md: filled after authentication).
        self._domains: OrderedDict[tuple[str, str, str, str], bytes] = OrderedDict()
        self._signers: OrderedDict[tuple[bytes, TransferAuthorization, bytes], str] = OrderedDict()

    def supported(self) -> dict[str, Any]:
        kinds = [{"x402Version": 2, "scheme": "exact", "network": network} for network in self._chains]
        signers: list[str] = []
        for chain in self._chains.values():
            address = getattr(chain, "settlement_address", None)
            if address and address not in signers:
                signers.append(address)
        return {"kinds": kinds, "extensions": [], "signers": {"eip155:*": signers}}

    def chain_for(self, network: str) -> Chain | None:
        return self._chains.get(network)

    def _domain(self, key: tuple[str, str, str, str], chain_id: int) -> bytes:
        """The domain separator, from the cache or computed; never stored here (see ``_remember``)."""
        cached = self._domains.get(key)
        if cached is not None:
            self._domains.move_to_end(key)
            return cached
        _, asset, name, version = key
        return domain_separator(name, version, chain_id, checksum_address(asset))

    def _remember(self, domain_key: tuple[str, str, str, str], domain: bytes,
                  signer_key: tuple[bytes, TransferAuthorization, bytes], signer: str) -> None:
        """Called only after the signature checked out: both keys are then bounded, signed data."""
        _put_bounded(self._domains, domain_key, domain, DOMAIN_CACHE_SIZE)
        _put_bounded(self._signers, signer_key, signer, SIGNER_CACHE_SIZE)

    def check_offline(self, payload: PaymentPayload, requirements: PaymentRequirements) -> CheckedPayment:
        """Everything that needs no chain: scheme, network, domain, recipient, amount, window, signature."""
        chain_id = self._served_chain_id(payload, requirements)
        name, version = _domain_fields(requirements)
        try:
            exact: ExactEvmPayload = parse_exact_evm(payload)
        except PaymentDecodeError as exc:
            raise Rejected("invalid_payload", exc.message) from None
        auth = self._authorization(exact, requirements)
        signature = bytes.fromhex(exact.signature[2:])
        domain_key = (requirements.network, requirements.asset.lower(), name, version)
        domain = self._domain(domain_key, chain_id)
        # verify and settle check the same payload: the second time, the signer is remembered
        # (the digest covers every field of the key, so a hit is the same signature on the same data).
        key = (domain, auth, signature)
        signer = self._signers.get(key)
        token = checksum_address(requirements.asset)
        if signer is not None:
            self._signers.move_to_end(key)
        else:
            digest = authorization_digest(domain, auth)
            signer = recover_signer(digest, signature)
            if signer is None or signer != auth.from_:
                if self._wallets is None:
                    raise Rejected("invalid_exact_evm_payload_signature", "signature does not recover to authorization.from")
                try:  # a contract wallet's, perhaps: confirmed on chain by verify and settle
                    wallet = self._wallets.parse(requirements.network, signature)
                except WalletRefused as refused:
                    raise Rejected(refused.reason, refused.message) from None
                return CheckedPayment(payer=auth.from_, token=token, auth=auth, signature=signature,
                                      wallet=wallet, digest=digest)
            self._remember(domain_key, domain, key, signer)
        return CheckedPayment(payer=auth.from_, token=token, auth=auth, signature=signature)

    def expiring(self, auth: TransferAuthorization) -> bool:
        """Too close to its validBefore to broadcast now (the margin ``check_offline`` keeps)."""
        return auth.valid_before < int(self._clock()) + VALID_BEFORE_MARGIN_SECONDS

    async def confirm_wallet(self, checked: CheckedPayment, network: str) -> None:
        """A contract wallet's signature, confirmed on chain (``Rejected`` if the wallet refuses it;
        ``ChainUnavailable`` if the chain cannot say); nothing for an EOA's."""
        if checked.wallet is None or self._wallets is None:
            return
        try:
            await self._wallets.check(network, checked.payer, checked.digest, checked.signature)
        except WalletRefused as refused:
            raise Rejected(refused.reason, refused.message) from None

    def _served_chain_id(self, payload: PaymentPayload, requirements: PaymentRequirements) -> int:
        """The chain id of the required network, if the payment is exact on it and it is served here."""
        if payload.accepted.scheme != "exact" or requirements.scheme != "exact":
            raise Rejected("unsupported_scheme", "only the exact scheme is supported")
        if payload.accepted.network != requirements.network:
            raise Rejected("network_mismatch", "payment network differs from the required network")
        chain_id = eip155_chain_id(requirements.network)
        if chain_id is None or requirements.network not in self._chains:
            raise Rejected("invalid_exact_evm_failed_to_get_network_config", f"network {requirements.network} is not served")
        return chain_id

    def _authorization(self, exact: ExactEvmPayload, requirements: PaymentRequirements) -> TransferAuthorization:
        """The authorization in integers, once recipient, amount and time window check out."""
        a = exact.authorization
        if a.to.lower() != requirements.pay_to.lower():
            raise Rejected("invalid_exact_evm_payload_recipient_mismatch", "authorization.to is not the payTo address")
        # Nothing to collect, and a broadcast would only burn the settlement account's gas.
        if int(requirements.amount) == 0 or int(a.value) == 0:
            raise Rejected("invalid_exact_evm_payload_zero_amount", "a payment of 0 is not settled")
        if a.from_.lower() == a.to.lower():
            raise Rejected(
                "invalid_exact_evm_payload_self_transfer", "authorization.from and authorization.to are the same address"
            )
        if int(a.value) != int(requirements.amount):
            raise Rejected(
                "invalid_exact_evm_payload_authorization_value_mismatch",
                f"authorization.value must be exactly {requirements.amount}",
            )
        clock = self._chain_clocks.get(requirements.network)  # the token judges the window by the block's time
        now = int(self._clock()) + (clock.ahead() if clock is not None else 0)
        valid_after, valid_before = int(a.valid_after), int(a.valid_before)
        if valid_before < now + VALID_BEFORE_MARGIN_SECONDS:
            raise Rejected("invalid_exact_evm_payload_authorization_valid_before", "authorization has expired")
        if valid_before > now + requirements.max_timeout_seconds + VALID_BEFORE_SLACK_SECONDS:
            raise Rejected(
                "invalid_exact_evm_payload_authorization_valid_before",
                "authorization is valid for longer than maxTimeoutSeconds allows",
            )
        if valid_after >= int(self._clock()) - (clock.behind() if clock is not None else 0):  # token: block.timestamp > validAfter
            raise Rejected("invalid_exact_evm_payload_authorization_valid_after", "authorization is not yet valid (by "
                           "the chain's clock, which takes it only in a block dated after validAfter)")
        return TransferAuthorization(
            from_=checksum_address(a.from_),
            to=checksum_address(a.to),
            value=int(a.value),
            valid_after=valid_after,
            valid_before=valid_before,
            nonce=bytes.fromhex(a.nonce[2:]),
        )

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        try:
            checked = self.check_offline(payload, requirements)
            await self.confirm_wallet(checked, requirements.network)
            if await self.in_flight.struck(requirements.network, checked.payer):
                raise Rejected(PAYER_CODE_REVERTED, STRUCK_MESSAGE)
        except Rejected as rej:
            return VerifyResponse(is_valid=False, invalid_reason=rej.reason, invalid_message=rej.message)
        chain, network, flights = self._chains[requirements.network], requirements.network, self.in_flight
        mark = flights.balance_mark(network, checked.token)  # before the read is sent (exact_guards)
        # Independent reads: one round trip's latency (one JSON-RPC batch), not three.
        used, balance, code = await _gather(
            chain.authorization_state(checked.token, checked.payer, checked.auth.nonce),
            chain.balance_of(checked.token, checked.payer),
            chain.get_code(checked.payer),
        )
        flights.saw_balance(network, checked.token, checked.payer, balance, mark)
        if used:
            return VerifyResponse(
                is_valid=False,
                invalid_reason="invalid_exact_evm_nonce_already_used",
                invalid_message="this authorization was already used or canceled on chain",
                payer=checked.payer,
            )
        if (balance < checked.auth.value + flights.taken(network, checked.token, checked.payer)
                and balance < checked.auth.value + await flights.pending(network, checked.token, checked.payer)):
            return VerifyResponse(
                is_valid=False,
                invalid_reason=INSUFFICIENT_BALANCE,
                invalid_message="payer balance is below the price (beside its payments being settled now)",
                payer=checked.payer,
            )
        # An account with code asked by the token about its signature (exact_guards): simulated first.
        if code:
            flights.saw_code(network, checked.payer)
        refusal = await transfer_refusal(chain, code, checked.token, checked.auth, checked.signature,
                                         wallet_signature=checked.wallet.inner if checked.wallet is not None else None)
        if refusal is not None:
            return VerifyResponse(is_valid=False, invalid_reason=refusal, payer=checked.payer,
                                  invalid_message="the payer account's code refuses this transfer (simulated)")
        return VerifyResponse(is_valid=True, payer=checked.payer)

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        network = requirements.network
        try:
            checked = self.check_offline(payload, requirements)
            await self.confirm_wallet(checked, network)
            await self._deploy(checked, network)
        except Rejected as rej:
            return SettleResponse(success=False, error_reason=rej.reason, error_message=rej.message, network=network)
        chain = self._chains[network]
        if await self.in_flight.holds(network, checked.token, checked.payer, checked.auth.nonce):
            # Its settlement is in flight or its outcome unknown (pending, in the pool): a second broadcast reverts.
            return SettleResponse(success=False, error_reason="payment_in_flight", payer=checked.payer, network=network,
                                  error_message="this authorization's settlement is still in flight")
        async with self.in_flight.hold(chain, network, checked.token, checked.payer, checked.auth.value,
                                       mined_by(chain, checked), checked.auth.nonce) as held:
            if not held.covered:  # its other settlements in flight take its balance: this one would revert on our gas
                return in_flight_refusal(checked.payer, network, held.reason)
            return held.judged(await self._send_and_wait(chain, checked, network, before_send))

    async def _send_and_wait(self, chain: Chain, checked: CheckedPayment, network: str,
                             before_send: BeforeSend | None) -> SettleResponse:
        try:
            tx_hash = await self._send(chain, checked, network, before_send)
        except BroadcastUncertain as exc:
            return self._pending(exc.tx_hash, checked, network)
        except ChainUnavailable as exc:
            rpc_message = getattr(exc, "rpc_message", None)
            if rpc_message is None:
                raise
            # The node refused the transaction outright: nothing was broadcast.
            refused = SettleResponse(success=False, error_reason=revert_reason_code(rpc_message), payer=checked.payer,
                                     error_message="the chain refused the settlement transaction", network=network)
            return await self.used_nonce_outcome(chain, checked, refused)
        try:
            receipt = await chain.wait_for_receipt(tx_hash, self._receipt_timeout)
        except ChainUnavailable:
            receipt = None  # broadcast, then the node stopped answering: the outcome is unknown
        if receipt is None:
            return self._pending(tx_hash, checked, network)
        return await self._outcome(chain, receipt, checked, network)

    async def _send(self, chain: Chain, checked: CheckedPayment, network: str, before_send: BeforeSend | None) -> str:
        """The transfer: the v,r,s overload for an EOA's signature; for a contract wallet's, the
        ``bytes`` overload with what the wallet checks (a 6492 wrapper's inner signature)."""
        wallet_chain = self._wallets.chain(network) if self._wallets is not None else None
        if checked.wallet is None or wallet_chain is None:
            return await chain.send_transfer_with_authorization(checked.token, checked.auth, checked.signature, before_send)
        return await wallet_chain.send_transfer_with_signature_bytes(
            checked.token, checked.auth, checked.wallet.inner, before_send
        )

    async def _deploy(self, checked: CheckedPayment, network: str) -> None:
        """An undeployed ERC-6492 wallet deployed through its (allow-listed) factory before its
        transfer; ``Rejected`` when that fails (nothing of the payer's moved)."""
        chain = self._wallets.chain(network) if self._wallets is not None else None
        if checked.wallet is None or checked.wallet.factory is None:
            return
        if chain is None:
            raise Rejected("invalid_exact_evm_payload_signature", f"contract-wallet signatures are not settled on {network}")
        try:
            await deploy_wallet(chain, checked.payer, checked.wallet, self._receipt_timeout)
        except WalletRefused as refused:
            raise Rejected(refused.reason, refused.message) from None

    def _pending(self, tx_hash: str | None, checked: CheckedPayment, network: str) -> SettleResponse:
        return SettleResponse(success=False, error_reason="settlement_pending", payer=checked.payer, transaction=tx_hash or "",
                              error_message="the settlement transaction was broadcast but is not final yet", network=network)

    async def used_nonce_outcome(self, chain: Chain, checked: CheckedPayment, failed: SettleResponse) -> SettleResponse:
        """``failed`` as it is, unless it failed because the authorization's nonce is used and the
        transaction that used it moved this payment's money to its payTo (a front-runner copied it
        from our pending transaction, or the payer sent it itself): then the payment is settled, by
        that transaction. Pending when the chain cannot say: money may have moved."""
        if failed.error_reason != "invalid_exact_evm_nonce_already_used":
            return failed
        a = checked.auth
        try:
            receipt = await settled_elsewhere(chain, checked.token, a.from_, a.nonce, a.to, a.value)
        except ChainUnavailable:
            return self._pending(failed.transaction or None, checked, failed.network)
        if receipt is None:
            return failed
        # Our own (failed) transaction's gas stays with the row: the gateway paid it for this payment.
        extra = {**(failed.extra or {}), "blockNumber": receipt.block_number}
        return SettleResponse(success=True, amount=str(a.value), payer=checked.payer, transaction=receipt.tx_hash,
                              network=failed.network, extra=extra)

    async def _outcome(self, chain: Chain, receipt: Receipt, checked: CheckedPayment, network: str) -> SettleResponse:
        base: dict[str, Any] = {"payer": checked.payer, "transaction": receipt.tx_hash, "network": network}
        if receipt.status == 1:
            if not receipt.has_transfer(checked.token, checked.auth.from_, checked.auth.to, checked.auth.value):
                return SettleResponse(success=False, error_reason="invalid_exact_evm_transfer_event_mismatch", **base)
            return SettleResponse(success=True, amount=str(checked.auth.value),
                                  extra={"blockNumber": receipt.block_number, **gas_extra(_one(receipt))}, **base)
        # Reverted (certain: nothing moved). Say why, from the chain state the revert depended on.
        reason = "transaction_failed"  # unexplained: its payer's code, if it has any, is struck (exact_guards)
        try:
            if (traced := revert_reason_code(await traced_revert(chain, receipt.tx_hash))) != "transaction_failed":
                reason = traced  # the node's tracer says (a balance moved out and back within the block shows here only)
            elif await chain.authorization_state(checked.token, checked.payer, checked.auth.nonce):
                reason = "invalid_exact_evm_nonce_already_used"
            elif await chain.balance_of(checked.token, checked.payer) < checked.auth.value:
                reason = "invalid_exact_evm_insufficient_balance"
            elif await mined_past(chain, receipt.block_number, checked.auth.valid_before):  # mined past its window
                reason = "invalid_exact_evm_payload_authorization_valid_before"
        except ChainUnavailable:
            reason = SETTLEMENT_REVERTED  # why is not known: nobody is struck
        extra = {"blockNumber": receipt.block_number, **gas_extra(_one(receipt))}  # a revert costs gas too
        return await self.used_nonce_outcome(chain, checked, SettleResponse(
            success=False, error_reason=reason, extra=extra, **base))


def mined_by(chain: Chain, checked: CheckedPayment) -> Mined:
    """Whether ``checked``'s authorization is used on chain (its settlement mined: ``InFlight``)."""
    return lambda: chain.authorization_state(checked.token, checked.payer, checked.auth.nonce)


def _one(receipt: Receipt) -> GasShare | None:
    shares = receipt_shares(receipt, 1)
    return None if shares is None else shares[0]
