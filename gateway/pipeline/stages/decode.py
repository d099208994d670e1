"""Stages ``decode_and_bind`` and ``wallet_check``: read the payment off the request, bind it to this
offer, establish who signed it.

``decode_and_bind`` writes ``ctx.payload`` and ``ctx.paid``. Who signed is recovered offline, over
this offer's own token domain, before anything is keyed on the payer: payer and nonce are public
once a payment settles, so a header naming them proves nothing, and a junk signature costs no
lookup, lock, rate-limit token or RPC. A signature that is not ``from``'s own ECDSA signature may be
a contract wallet's (ERC-1271, or ERC-6492 for a wallet not deployed yet): when this gateway can
check those on the offer's network, its shape is checked offline (length cap; a 6492 factory must
be on the allow-list) and ``wallet_check`` asks the chain, with one gas-capped ``eth_call``, right
after: behind the per-client rate limit (``pre_challenge_safety``), and before the payer lists, the
per-payer limits, the in-flight lock and the ledger lookup, which all key on the payer, so those
only ever see a payer whose signature checked out. Stops with 400 (not a payment), 402 (another
offer; a bad signature; a factory not allowed) or 503 (the chain cannot say).
"""

from __future__ import annotations

from starlette.responses import JSONResponse, Response

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import PAYMENT_SIGNATURE, X_PAYMENT
from gateway.pipeline.context import Paid, RequestContext
from gateway.pipeline.stages.exactly_once import request_fingerprint
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import Quote
from gateway.protocol.payment import (
    bind,
    decode_payment,
    decode_payment_v1,
    payment_identifier,
)
from gateway.protocol.receipts import receipt_headers
from settlement.chain.addresses import checksum_address
from settlement.errors import ChainUnavailable, PaymentDecodeError
from settlement.schemes import Schemes
from settlement.schemes.channels import BATCH, ChannelsEvm
from settlement.schemes.channels_contract import channel_payment, channel_signer, parse_channel
from settlement.schemes.exact_permit2_payload import is_permit2_offer, permit2_payment, permit2_signer
from settlement.schemes.signatures import SignerCheck
from settlement.schemes.upto import UPTO
from settlement.schemes.upto_permit import upto_signer
from settlement.schemes.wallets import WalletRefused, WalletSignature, WalletSignatures
from settlement.x402.codec import parse_exact_evm
from settlement.x402.digits import is_digits
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, PaymentRequirements

__all__ = ["DecodeAndBind", "WalletCheck"]

_BAD_SIGNATURE = "the signature does not recover to authorization.from for this offer; sign the offer again"


class DecodeAndBind:
    name = "decode_and_bind"
    shape_only = False

    def __init__(self, signers: SignerCheck, wallets: WalletSignatures | None = None, schemes: Schemes | None = None) -> None:
        self.signers = signers
        self.wallets = wallets
        self.schemes = schemes  # batch-settlement's refund requests are answered here

    async def __call__(self, ctx: RequestContext) -> Response | None:
        request, quote = ctx.request, ctx.quote
        assert request is not None and quote is not None
        ctx.payment_received = True
        headers = request.headers
        if len(headers.getlist(PAYMENT_SIGNATURE)) > 1 or len(headers.getlist(X_PAYMENT)) > 1:
            # A proxy or a log may read another of them than we would: one payment, one reading.
            # (One of each is no ambiguity: PAYMENT-SIGNATURE, x402 v2, is the one read.)
            raise GatewayError(codes.PAYMENT_HEADER_REPEATED, "send a payment header once; this request repeats one "
                               "(PAYMENT-SIGNATURE or X-PAYMENT); nothing was spent")
        header = headers.get(PAYMENT_SIGNATURE)
        if header is not None:
            payload = decode_payment(header)
            quote = bind(quote, payload)
        else:
            payload, quote = decode_payment_v1(str(request.headers.get(X_PAYMENT)), quote, self._recovers)
        # The offer the payer chose (of a tool's several): the stages after this one follow it.
        ctx.payload, ctx.quote, ctx.tool = payload, quote, quote.tool
        if quote.requirements.scheme == BATCH:  # batch-settlement: keyed by (channel, cumulative amount)
            if isinstance(payload.payload, dict) and payload.payload.get("type") == "refund":
                return await self._channel_refund(ctx, quote, payload)  # the payer's refund: nothing bought
            ctx.paid = self._channel(ctx, quote, payload)
            return None
        # upto, and exact through Permit2: keyed by the Permit2 authorization's payer and nonce
        permit2 = quote.requirements.scheme == UPTO or is_permit2_offer(quote.requirements)
        try:
            exact = permit2_payment(quote.requirements, payload.payload) if permit2 else parse_exact_evm(payload)
        except PaymentDecodeError as exc:
            raise GatewayError(exc.code, exc.message) from None
        identifier = payment_identifier(payload)
        if identifier is None and quote.offer.identifier_required:
            raise PaymentChallenge(
                quote, codes.PAYMENT_IDENTIFIER_MISSING,
                "this gateway requires a payment-identifier with every payment (x402 extension "
                "payment-identifier, extensions.payment-identifier.info.id): send this payment again with one; "
                "nothing was spent",
            )
        principal = ctx.user.principal if ctx.user is not None else None  # a user-scoped tool's user
        fingerprint = request_fingerprint(ctx.method, ctx.path, ctx.query, ctx.body, principal)
        signer = self._signer(quote.requirements, payload, exact)
        wallet, digest = None, b""
        if signer is None and permit2:
            raise PaymentChallenge(quote, "invalid_permit2_signature", "the signature is not from's over this Permit2 authorization")
        if signer is None:
            wallet, digest = self._wallet_claim(quote, exact)
            signer = checksum_address(exact.authorization.from_)
        if not permit2:
            _pays_the_offer(quote, exact)
        ctx.paid = Paid(
            payload=payload, exact=exact, signer=signer, nonce=exact.authorization.nonce.lower(),
            identifier=identifier, fingerprint=fingerprint, wallet=wallet, digest=digest,
        )
        return None

    def _signer(self, requirements: PaymentRequirements, payload: PaymentPayload, exact: ExactEvmPayload) -> str | None:
        """``from`` when the signature is its ECDSA one over this offer's authorization (EIP-3009,
        upto's Permit2 one, or exact's Permit2 one), offline; else None."""
        if requirements.scheme == UPTO:
            return upto_signer(requirements.network, payload.payload)
        if is_permit2_offer(requirements):
            return permit2_signer(requirements.network, payload.payload)
        return self.signers.signer(requirements, exact)

    def _wallet_claim(self, quote: Quote, exact: ExactEvmPayload) -> tuple[WalletSignature, bytes]:
        """Not ``from``'s ECDSA signature: a contract wallet's, if it has the shape of one (checked
        offline) and this gateway checks wallets on the network; otherwise the 402."""
        network = quote.requirements.network
        digest = self.signers.digest(quote.requirements, exact)
        if self.wallets is None or not self.wallets.serves(network) or digest is None:
            raise PaymentChallenge(quote, "invalid_exact_evm_payload_signature", _BAD_SIGNATURE)
        try:
            return self.wallets.parse(network, bytes.fromhex(exact.signature[2:])), digest
        except ValueError:
            raise PaymentChallenge(quote, "invalid_exact_evm_payload_signature", _BAD_SIGNATURE) from None
        except WalletRefused as refused:
            raise PaymentChallenge(quote, refused.reason, refused.message) from None

    def _recovers(self, requirements: PaymentRequirements, payload: PaymentPayload) -> bool:
        """Whether a v1 payment's signature recovers to its payer under this offer's token domain."""
        try:
            return self.signers.signer(requirements, parse_exact_evm(payload)) is not None
        except PaymentDecodeError:
            return False

    def _channel(self, ctx: RequestContext, quote: Quote, payload: PaymentPayload) -> Paid:
        """A batch-settlement payment: its channel id is its config's and its voucher is signed by
        the channel's payer authorizer, recovered offline; keyed by (channel, cumulative amount)."""
        network = quote.requirements.network
        try:
            exact = channel_payment(payload.payload)
        except PaymentDecodeError as exc:
            raise PaymentChallenge(quote, exc.code, exc.message) from None
        payment = parse_channel(payload.payload)
        if payment is None or not is_digits(network[7:]) or not payment.bound(int(network[7:])):
            raise PaymentChallenge(quote, codes.CHANNEL_ID_MISMATCH, "voucher.channelId is not the id of channelConfig")
        signer = channel_signer(network, payload.payload)
        if signer is None:
            raise PaymentChallenge(quote, codes.VOUCHER_SIGNATURE_INVALID,
                                   "the voucher is not signed by the channel's payer authorizer; sign it again")
        principal = ctx.user.principal if ctx.user is not None else None
        return Paid(
            payload=payload, exact=exact, signer=signer, nonce=exact.authorization.nonce.lower(),
            identifier=payment_identifier(payload),
            fingerprint=request_fingerprint(ctx.method, ctx.path, ctx.query, ctx.body, principal),
        )

    async def _channel_refund(self, ctx: RequestContext, quote: Quote, payload: PaymentPayload) -> Response:
        """A batch-settlement payer's cooperative refund request, answered here: no upstream call,
        no ledger row (``ChannelsEvm.refund_request``: claim what is accrued, refund the rest)."""
        scheme = self.schemes.get(BATCH, quote.requirements.network) if self.schemes is not None else None
        if not isinstance(scheme, ChannelsEvm):
            raise PaymentChallenge(quote, codes.CHANNEL_REFUND_UNAVAILABLE, "this gateway takes no refund requests here")
        result = await scheme.refund_request(payload, quote.requirements)
        ctx.record("channel_refund", success=result.success, payer=result.payer, amount=result.amount,
                   transaction=result.transaction or None, reason=result.error_reason)
        headers = receipt_headers(result, quote.version)
        if not result.success:
            challenge = PaymentChallenge(quote, result.error_reason or codes.CHANNEL_REFUND_UNAVAILABLE,
                                         result.error_message or "the refund was refused")
            challenge.headers.update(headers)
            raise challenge
        return JSONResponse({"refunded": result.amount, "transaction": result.transaction}, headers=headers)


def _pays_the_offer(quote: Quote, exact: ExactEvmPayload) -> None:
    """An EIP-3009 authorization pays this offer: its ``to`` is payTo and its ``value`` the price,
    checked here for every facilitator (a remote one that checks the signature alone would settle
    an underpayment, or a payment to another address, that the ledger then books at the price)."""
    requirements, a = quote.requirements, exact.authorization
    if a.to.lower() != requirements.pay_to.lower():
        raise PaymentChallenge(quote, codes.RECIPIENT_MISMATCH, "authorization.to is not the payTo address")
    if int(a.value) != int(requirements.amount):
        raise PaymentChallenge(quote, codes.VALUE_MISMATCH,
                               f"authorization.value must be exactly {requirements.amount}")


class WalletCheck:
    """Stage ``wallet_check``: a contract wallet's signature confirmed on chain (one gas-capped
    ``eth_call``: ``isValidSignature``, or a simulated 6492 deployment and then it); nothing to do
    for an EOA's signature. The verdict is remembered only when valid, so the scheme's verify and
    settle of the same payment do not ask again."""

    name = "wallet_check"
    shape_only = False

    def __init__(self, wallets: WalletSignatures | None) -> None:
        self.wallets = wallets

    async def __call__(self, ctx: RequestContext) -> Response | None:
        quote, paid = ctx.quote, ctx.paid
        assert quote is not None and paid is not None
        if paid.wallet is None:
            return None
        assert self.wallets is not None  # decode_and_bind makes wallet claims only with wallets
        try:
            with ctx.timed("wallet_check"):
                await self.wallets.check(
                    quote.requirements.network, paid.signer, paid.digest, bytes.fromhex(paid.exact.signature[2:])
                )
        except WalletRefused as refused:
            raise PaymentChallenge(quote, refused.reason, refused.message) from None
        except ChainUnavailable as exc:
            raise GatewayError(
                "facilitator_unavailable", "the contract wallet's signature cannot be checked now; retry later",
                retryAfter=2,
            ) from exc
        ctx.record("contract_wallet_signature", wallet=paid.signer,
                   kind="erc6492" if paid.wallet.factory else "erc1271", factory=paid.wallet.factory)
        return None
