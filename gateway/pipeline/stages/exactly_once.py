"""Safety, part one: a payment is settled at most once, across requests, retries, crashes and replicas.

* An in-flight lock in the shared store on (network, payer, nonce), and on the client's
  ``payment-identifier`` when it sends one, from verify until the outcome is final: a second
  request with the same payment meanwhile gets 409 ``payment_in_flight``.
* A payment the ledger already knows is *resumed*, not re-run, but only when the request presents
  that very signed payload (``same_payment``: every authorization field equal, the signature
  already recovered to its payer) for that very request (tool and fingerprint of method, path,
  query and body). A settled one replays the answer it bought (or, if that answer was never
  stored, the pipeline says so and records the refund an ``upfront`` call is owed); an open one
  (``settling``/``pending``) is first resolved against the chain. Anything else that names a
  known payer and nonce (both public on chain) is a fresh payment, verified as one.
* ``payment-identifier`` (x402 extension): bound to a fingerprint of the request and to the
  payment; the same id with another request or payment is a 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.headers import X402GW_REFUND, X402GW_REPLAY
from gateway.pipeline.context import RequestContext
from gateway.pipeline.refunds import Refunds
from gateway.pipeline.stages.respond import respond
from gateway.pipeline.stages.verify import verify
from gateway.protocol.offers import Quote
from gateway.protocol.receipts import receipt_headers, signed_receipt_header
from gateway.store import StateStore, StoreUnavailable, payment_lock
from gateway.upstream.bridge import UpstreamResponse
from settlement.errors import ChainUnavailable
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.ledger.resolve import Resolver, apply, changes
from settlement.schemes import Schemes
from settlement.schemes.channels import VOUCHER_ACCEPTED, channel_view
from settlement.schemes.exact_permit2_payload import payment_view
from settlement.schemes.signatures import same_authorization
from settlement.x402.wire import ExactEvmPayload, PaymentRequirements, SettleResponse

__all__ = ["ExactlyOnce", "InFlight", "acquire", "release", "request_fingerprint", "resume", "same_payment"]


def request_fingerprint(method: str, path: str, query: str, body: bytes, principal: str | None = None) -> str:
    """``principal``: a user-scoped tool's token issuer and subject, so a payment's stored answer
    is only ever replayed to the user it was made for (another user's token: another request)."""
    verb = "GET" if method == "HEAD" else method
    digest = hashlib.sha256(body).hexdigest()
    user = "" if principal is None else "\n" + hashlib.sha256(principal.encode()).hexdigest()
    return hashlib.sha256(f"{verb}\n{path}\n{query}\n{digest}{user}".encode()).hexdigest()


def same_payment(
    row: Payment, requirements: PaymentRequirements, presented: ExactEvmPayload, tool: str, fingerprint: str
) -> bool:
    """Whether ``presented`` (whose signature already recovered to its ``from`` over this offer) is
    the payment ``row`` recorded, for the same request: same token and network, same tool and
    request fingerprint, and every field of the signed authorization equal."""
    if row.network != requirements.network or row.asset.lower() != requirements.asset.lower():
        return False
    if row.tool != tool or row.fingerprint != fingerprint or not row.authorization:
        return False
    try:
        stored = payment_view(json.loads(row.authorization))  # a Permit2 row's: its Permit2 authorization
    except ValueError:  # pydantic's ValidationError and json's JSONDecodeError are ValueErrors
        channel = channel_view(row)  # a batch-settlement row's: keyed by its channel and cumulative amount
        if channel is None:
            return False
        stored = channel
    return same_authorization(stored, presented)


async def acquire(store: StateStore, ctx: RequestContext, keys: list[str], ttl_ms: int) -> None:
    """Hold every key for the request (``ctx.locks``, released by the finalizers), or refuse with
    409 if another request holds one."""
    try:
        for key in keys:
            if not await store.acquire(key, ctx.request_id, ttl_ms):
                raise GatewayError(
                    "payment_in_flight",
                    "this payment is being processed by another request; resend it when that one has answered",
                    retryAfter=1,
                )
            ctx.locks = (*ctx.locks, key)
    except StoreUnavailable:
        raise store_unavailable() from None
    if ctx.locks and ctx.lock_keeper is None:
        # Held as long as the request runs, not only for the TTL sized for it: a stream read slowly,
        # a stalled settle or refund must never let a resend of this payment run beside it.
        ctx.lock_keeper = asyncio.ensure_future(_keep(store, ctx, ttl_ms))


async def _keep(store: StateStore, ctx: RequestContext, ttl_ms: int) -> None:
    """Renew the request's locks every third of their TTL until ``release`` cancels this."""
    while True:
        await asyncio.sleep(ttl_ms / 3000)
        try:
            for key in ctx.locks:
                await store.extend(key, ctx.request_id, ttl_ms)
        except StoreUnavailable:
            pass  # tried again at the next turn; the TTL still covers the request's planned worst case


async def release(store: StateStore, ctx: RequestContext) -> None:
    """Give back the request's in-flight locks, last taken first; never raises."""
    keeper, ctx.lock_keeper = ctx.lock_keeper, None
    if keeper is not None:
        keeper.cancel()
    held, ctx.locks = ctx.locks, ()
    for key in reversed(held):
        try:
            await store.release(key, ctx.request_id)
        except StoreUnavailable:
            pass  # the lock expires on its own


def store_unavailable() -> GatewayError:
    return GatewayError("store_unavailable", "the gateway's shared state is unavailable; retry later",
                        status=503, retryAfter=2)


def receipt_of(row: Payment) -> SettleResponse:
    return SettleResponse(
        success=True, transaction=row.tx_hash or "", network=row.network, payer=row.payer, amount=str(row.amount),
        extra={"blockNumber": row.block_number} if row.block_number is not None else None,
    )


class Resumed:
    """What a known payment turned out to be: a stored answer to replay, or nothing (run it fresh)."""

    def __init__(self, row: Payment, answer: tuple[int, list[tuple[str, str]], bytes] | None) -> None:
        self.row = row
        self.answer = answer


async def resume(
    row: Payment, ledger: Ledger, schemes: Resolver
) -> Resumed | None:
    """Resume a payment the ledger knows. Returns the settled payment with its stored answer to
    replay (``answer`` is None when none was stored), ``None`` when the payment moved no money and
    may run again, or raises the refusal that names what happened."""
    if row.state in (PaymentState.SETTLING, PaymentState.PENDING):
        try:
            resolution = await schemes.resolve(row)  # the payment's scheme says what happened
        except ChainUnavailable:
            raise _open_refusal(row) from None
        if resolution is None:  # no scheme here can tell (no chain access for its network)
            raise _open_refusal(row)
        if resolution.reason == VOUCHER_ACCEPTED:  # batch-settlement: accrued, its answer is paid for
            answer = await ledger.run(ledger.stored_response, row.id)
            if answer is None:
                raise _open_refusal(row)
            return Resumed(row, answer)
        if changes(row, resolution):
            await ledger.run(apply, ledger, resolution)
        refreshed = await ledger.run(ledger.get, row.id)
        assert refreshed is not None
        row = refreshed
    if row.state == PaymentState.SETTLED:
        answer = await ledger.run(ledger.stored_response, row.id)
        return Resumed(row, answer)
    if row.state in (PaymentState.SETTLING, PaymentState.PENDING):
        raise _open_refusal(row)
    return None  # verified / voided / failed: nothing moved; the caller runs it (the row is reused)


def _open_refusal(row: Payment) -> GatewayError:
    fields: dict[str, Any] = {"paymentId": row.id, "retryAfter": 5}
    if row.tx_hash:
        fields["transaction"] = row.tx_hash
        return GatewayError(
            "settlement_pending",
            "this payment's settlement is not final yet; the content is held; resend the same payment later",
            status=503, **fields,
        )
    return GatewayError(
        "settlement_unknown",
        "this payment's settlement outcome is not known yet; resend the same payment later",
        status=503, **fields,
    )


class InFlight:
    """Stage ``in_flight``: one request at a time per payment (and per payment-identifier)."""

    name = "in_flight"
    shape_only = False

    def __init__(self, store: StateStore, lock_ttl_ms: int) -> None:
        self.store = store
        self.lock_ttl_ms = lock_ttl_ms

    async def __call__(self, ctx: RequestContext) -> Response | None:
        quote, paid = ctx.quote, ctx.paid
        assert quote is not None and paid is not None
        keys = [payment_lock(quote.requirements.network, paid.signer, paid.nonce)]
        if paid.identifier is not None:
            keys.append(f"pid:{paid.identifier}")
        await acquire(self.store, ctx, keys, self.lock_ttl_ms)
        return None


class ExactlyOnce:
    """Stage ``exactly_once``: a payment (or payment-identifier) the ledger knows is resumed, not
    re-run; answers a resend with the answer it bought. A fresh payment passes on, its verify
    already started beside the ledger lookup (``Paid.early_verify``, awaited by ``verify``)."""

    name = "exactly_once"
    shape_only = False

    def __init__(self, ledger: Ledger, schemes: Schemes, refunds: Refunds, receipts: ReceiptSigner | None = None,
                 public_url: str | None = None) -> None:
        self.ledger = ledger
        self.schemes = schemes
        self.refunds = refunds
        self.receipts = receipts  # a replay carries the signed receipt the first answer carried
        self.public_url = public_url

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None
        ledger, requirements = self.ledger, quote.requirements
        known = None
        if paid.identifier is not None:
            known = await ledger.run(ledger.by_payment_identifier, paid.identifier)
            if known is not None and (
                known.fingerprint != paid.fingerprint or known.payer != paid.signer or known.nonce != paid.nonce
            ):
                raise GatewayError(
                    "payment_identifier_conflict",
                    "this payment-identifier was used for a different request or payment; use a new id",
                    status=409, paymentId=known.id,
                )
        if known is None:
            # The ledger lookup and the scheme's verify run side by side (a fresh payment, the usual
            # case, needs both); for a payment the ledger knows, verify runs again after resume.
            paid.early_started = time.perf_counter()
            paid.early_verify = asyncio.ensure_future(verify(self.schemes, quote, paid.payload))
            known = await ledger.run(
                ledger.by_authorization, requirements.network, requirements.asset, paid.signer, paid.nonce
            )
        if (
            known is None
            or known.state in (PaymentState.VERIFIED, PaymentState.VOIDED, PaymentState.FAILED)
            or not same_payment(known, requirements, paid.exact, tool.name, paid.fingerprint)
        ):
            # Fresh, or something else naming a known payment: verified as a fresh one (a used
            # nonce then gets its 402; one still settling, a 409).
            return None
        # A resend of this very signed payload for this very request: resumed, not re-run.
        discard_early_verify(ctx)
        if known.payment_identifier is not None and paid.identifier != known.payment_identifier:
            # Once settled, the signed payload is public on chain (calldata): anyone can rebuild it.
            # The payment-identifier the payer first sent is not: without it, no answer of theirs.
            raise GatewayError(
                "payment_identifier_required",
                "this payment was first sent with a payment-identifier; only a resend with that same id "
                "gets its answer again",
                status=409,
            )
        resumed = await resume(known, ledger, self.schemes)
        if resumed is None:
            return None
        ctx.payer, ctx.payment_id = paid.signer, known.id
        if resumed.answer is None:
            raise await self._answer_lost(ctx, quote, resumed.row)
        ctx.outcome = "replayed"
        status, headers, body = resumed.answer
        replay = respond(UpstreamResponse(status, headers, body), receipt_of(resumed.row), ctx.request_id, quote.version)
        replay.headers[X402GW_REPLAY] = "true"
        if status >= 400 and resumed.row.refund_owed is None:  # an upfront call the caller's request failed: charged
            replay.headers[X402GW_REFUND] = "none"
        if self.receipts is not None and resumed.row.state == PaymentState.SETTLED and resumed.row.tx_hash:
            replay.headers.update(signed_receipt_header(self.receipts.receipt(resumed.row, self.public_url)))
        return replay

    async def _answer_lost(self, ctx: RequestContext, quote: Quote, row: Payment) -> GatewayError:
        """A settled payment with no stored answer: an ``upfront`` call whose process died between
        the settlement and the stored answer (or whose upstream failed). It is never charged again
        and never run again (the upstream may have acted); a refund is owed, once."""
        receipt = receipt_headers(receipt_of(row), quote.version)
        if row.settle_mode == "upfront" and row.refund_owed is None:
            ctx.payer = ctx.payer or row.payer
            refund = await self.refunds.owe(ctx, quote, row.id, "answer_lost", request_id=row.request_id)
            return GatewayError(
                "upstream_answer_lost",
                "this payment was settled but the answer it bought was lost; it will not be charged "
                "again and a refund is owed",
                status=502, headers=receipt, retryable=False, paymentId=row.id, transaction=row.tx_hash, **refund,
            )
        fields: dict[str, Any] = {}
        if row.refund_owed is not None:
            fields = {"refund": "refunded" if row.refunded_at else "owed", "refundAmount": str(row.refund_owed)}
            if row.refund_tx:
                fields["refundTransaction"] = row.refund_tx
        return GatewayError(
            "payment_already_settled",
            "this payment was settled and its answer is not stored; it will not be charged again",
            status=409, headers=receipt, paymentId=row.id, transaction=row.tx_hash, **fields,
        )


def discard_early_verify(ctx: RequestContext) -> None:
    """Cancel a verify started early whose answer is no longer wanted, and never leave its error unread."""
    paid = ctx.paid
    if paid is None or paid.early_verify is None:
        return
    future, paid.early_verify = paid.early_verify, None
    future.cancel()
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
