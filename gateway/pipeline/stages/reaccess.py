"""Stage ``reaccess``, right after ``challenge``: a payer who paid for this resource within the tool's
window gets it again by signing the 402's sign-in-with-x challenge instead of paying.

Runs only for a tool with ``reaccess`` (``catalog.reaccess``) on a request that carries
``SIGN-IN-WITH-X`` and no payment (a payment header wins: it is a payment). In this order, so that
nothing is spent on junk and the payer is only ever an address that signed:

1. the header's fields (``gateway.protocol.siwx``), then the SDK's checks: domain and uri of this
   gateway's public origin, issuedAt at most five minutes old, expiry, notBefore; then the uri (and
   the resources, when listed) is this request's URL, as its 402's challenge named it: a sign-in
   made for one resource opens no other (``invalid_siwx_uri_mismatch``);
2. the signature: the address's own EIP-191 signature of the EIP-4361 text, or, where this gateway
   checks contract wallets on that network, the wallet's ERC-1271 / ERC-6492 verdict (one capped
   ``eth_call``, behind the per-client rate limit ``pre_challenge_safety`` took);
3. the payer's allow/deny lists and per-payer limits (as for a payment);
4. the ledger: the latest settled payment of this address for this tool (and, under ``match:
   request``, this very request's fingerprint) that moved money (an upto charge of 0 did not) and
   owes no refund, made within the window; then the nonce, taken once in the shared state store (a
   replayed sign-in is refused, on any replica; a sign-in of an address that never paid leaves none).

Then the answer: under ``match: request`` the answer that payment bought, as stored in the ledger
(the API owner's upstream is not called again for what was already paid for; a tool without side
effects whose answer was not stored is called afresh); under ``match: tool`` the upstream is called
(only tools without side effects may have it). No money moves, no budget is reserved, no ledger
row is written; the audit trail records ``reaccess_granted`` with the payment it stands on, or
``reaccess_refused`` with its code. Every refusal is a 402 that offers payment and a fresh sign-in.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.responses import Response

from catalog import Tool
from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import SIGN_IN_WITH_X, X402GW_REACCESS, lower
from gateway.pipeline.context import RequestContext
from gateway.pipeline.stages.answer import drift_problems, parse_answer, trimmed_answer
from gateway.pipeline.stages.audit import RecordingUpstream
from gateway.pipeline.stages.exactly_once import request_fingerprint, store_unavailable
from gateway.pipeline.stages.respond import respond
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import Quote
from gateway.protocol.siwx import (
    MAX_AGE_SECONDS,
    SignIn,
    SignInRefused,
    origin_of,
    parse_sign_in,
    recover_sign_in,
    require_resource,
    sign_in_digest,
    validate_sign_in,
)
from gateway.safety.checks import Safety
from gateway.store import StateStore, StoreUnavailable
from gateway.upstream.bridge import Bridge, UpstreamClient, UpstreamResponse
from gateway.upstream.user_auth import UserAuthority
from settlement.errors import ChainUnavailable
from settlement.ledger import Ledger, Payment
from settlement.schemes.wallets import WalletRefused, WalletSignatures

__all__ = ["Reaccess", "signs_in"]

_SIGN_IN = lower(SIGN_IN_WITH_X)
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A used nonce is remembered past the oldest issuedAt still accepted (and some clock skew).
NONCE_TTL_MS = (MAX_AGE_SECONDS + 60) * 1000
_UNREACHABLE = ("upstream_timeout", "upstream_unavailable")  # what counts against the breaker


def signs_in(ctx: RequestContext) -> bool:
    """A request to a tool with re-access that carries a sign-in (``challenge`` lets it through)."""
    compiled, request = ctx.compiled, ctx.request
    return (compiled is not None and compiled.tool.reaccess is not None and request is not None
            and _SIGN_IN in request.headers)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite gives naive UTC


class Reaccess:
    name = "reaccess"
    shape_only = False

    def __init__(
        self, *, ledger: Ledger, store: StateStore, safety: Safety, bridge: Bridge, upstream: UpstreamClient,
        max_response_bytes: int, wallets: WalletSignatures | None = None, users: UserAuthority | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.safety = safety
        self.bridge = bridge
        self.upstream = upstream
        self.max_response_bytes = max_response_bytes
        self.wallets = wallets
        self.users = users

    async def __call__(self, ctx: RequestContext) -> Response | None:
        if ctx.paying or not signs_in(ctx):
            return None  # a payment (or nothing to do): the stages after this one
        quote, request, tool = ctx.quote, ctx.request, ctx.tool
        assert quote is not None and request is not None and tool is not None and tool.reaccess is not None
        try:
            sign_in = parse_sign_in(request.headers[_SIGN_IN], [r.network for r in quote.offer.options])
            await validate_sign_in(sign_in, origin_of(quote.resource_url))
            require_resource(sign_in, quote.resource_url)  # made for this request's URL, not another tool's
            await self._signature(sign_in)
        except SignInRefused as refused:
            raise self._refused(ctx, quote, refused.code, refused.message) from None
        address = sign_in.address
        # payer lists and per-payer limits, as for a payment; the tool's tokens only once the payment is found
        await self.safety.before_verify(ctx, tool, address)
        # The payment first: a fresh key's sign-in (nothing paid) leaves no nonce behind in the store.
        row = await self._payment(ctx, quote, tool, address)
        try:
            fresh = await self.store.put(f"siwx:nonce:{sign_in.payload.nonce}", b"1", NONCE_TTL_MS, only_if_absent=True)
        except StoreUnavailable:
            raise store_unavailable() from None
        if not fresh:
            raise self._refused(ctx, quote, codes.INVALID_SIWX_NONCE, "this sign-in was used already; sign the new challenge", address)
        await self.safety.per_tool(ctx, tool)  # a sign-in of a fresh key (nothing paid) spends none of them
        ctx.payer = address
        stored = None
        if tool.reaccess.match == "request":
            stored = await self.ledger.run(self.ledger.stored_response, row.id)
            if stored is None and (tool.method in _STATE_CHANGING or tool.side_effects):
                raise self._refused(ctx, quote, codes.REACCESS_ANSWER_UNAVAILABLE,
                                    "the answer this payment bought is not stored, and this tool is not called again for free",
                                    address)
        ctx.record("reaccess_granted", paymentId=row.id, payer=address, match=tool.reaccess.match,
                   served="stored" if stored is not None else "upstream", nonce=sign_in.payload.nonce,
                   paidAt=_aware(row.created_at).isoformat(), network=sign_in.network)
        ctx.outcome = "reaccessed"
        answer = UpstreamResponse(*stored) if stored is not None else await self._call(ctx, tool)
        response = respond(answer, None, ctx.request_id, quote.version)
        response.headers[X402GW_REACCESS] = str(row.id)
        return response

    async def _signature(self, sign_in: SignIn) -> None:
        """The address's own signature, or a contract wallet's accepted on chain; else refused."""
        if recover_sign_in(sign_in):
            return
        wallets, network = self.wallets, sign_in.network
        refused = SignInRefused(codes.INVALID_SIWX_SIGNATURE, "the signature is not the address's over this sign-in")
        if wallets is None or not wallets.serves(network):
            raise refused
        try:
            signature = bytes.fromhex(sign_in.payload.signature[2:])
            await wallets.check(network, sign_in.address, sign_in_digest(sign_in), signature)
        except (ValueError, WalletRefused):
            raise refused from None
        except ChainUnavailable as exc:
            raise GatewayError(codes.FACILITATOR_UNAVAILABLE, "the contract wallet's sign-in cannot be checked now; retry later",
                               retryAfter=2) from exc

    async def _payment(self, ctx: RequestContext, quote: Quote, tool: Tool, address: str) -> Payment:
        """The settled payment this sign-in stands on, made within the window; else refused."""
        assert tool.reaccess is not None
        fingerprint = None
        if tool.reaccess.match == "request":
            principal = ctx.user.principal if ctx.user is not None else None  # a user-scoped tool's user
            fingerprint = request_fingerprint(ctx.method, ctx.path, ctx.query, ctx.body, principal)
        # Paid to this tool's owner, at one of its offers' addresses: never a same-named tool's of another owner.
        pay_to = {offer.terms.pay_to for offer in tool.offers}
        row = await self.ledger.run(self.ledger.latest_paid, address, tool.name, fingerprint, owner=tool.owner, pay_to=pay_to)
        resource = "this request" if fingerprint is not None else f"tool {tool.name}"
        if row is None:
            raise self._refused(ctx, quote, codes.REACCESS_NOT_PAID,
                                f"{address} has no settled payment for {resource}; pay for it", address)
        if _aware(row.created_at) < datetime.now(UTC) - timedelta(seconds=tool.reaccess.window):
            raise self._refused(ctx, quote, codes.REACCESS_WINDOW_EXPIRED,
                                f"{address} paid for {resource} more than {tool.reaccess.window}s ago; pay again", address,
                                paymentId=row.id)
        return row

    async def _call(self, ctx: RequestContext, tool: Tool) -> UpstreamResponse:
        """A fresh answer from the upstream (breaker told), checked and trimmed as a paid one is."""
        request = ctx.request
        assert request is not None
        try:
            user = await self.users.for_call(tool, ctx.user, ctx.payer) if self.users is not None else None
            with ctx.timed("upstream"):
                upstream = await self.bridge.forward(
                    RecordingUpstream(self.upstream, ctx), tool, ctx.method, ctx.params,
                    ctx.query if ctx.answer_request is None else ctx.answer_request.upstream_query, ctx.arguments,
                    dict(request.headers), ctx.body, ctx.request_id, self.max_response_bytes, user,
                )
        except GatewayError as err:
            await self.safety.upstream_result(ctx, tool, err.code not in _UNREACHABLE)
            ctx.outcome = "upstream_failed"
            raise
        ctx.upstream_status = upstream.status
        await self.safety.upstream_result(ctx, tool, upstream.status < 500)
        if upstream.status >= 300 or ctx.method == "HEAD":
            return upstream
        validator, wanted = ctx.compiled.output_validator if ctx.compiled else None, ctx.answer_request
        document = parse_answer(upstream.body) if validator is not None or (wanted is not None and wanted.trims) else None
        if validator is not None:
            problems = drift_problems(validator, document)
            if problems:
                handling = ctx.drift = tool.answers.drift if tool.answers and tool.answers.drift else "pass"
                ctx.record("upstream_schema_drift", handling=handling, upstreamStatus=upstream.status, problems=problems)
                if handling == "fail":
                    raise GatewayError(codes.UPSTREAM_SCHEMA_DRIFT, "the upstream's answer does not match the tool's output schema",
                                       status=502, retryable=False, upstreamStatus=upstream.status, problems=problems)
        return trimmed_answer(upstream, wanted, document) if wanted is not None and wanted.trims else upstream

    @staticmethod
    def _refused(ctx: RequestContext, quote: Quote, code: str, message: str, payer: str | None = None,
                 **fields: object) -> PaymentChallenge:
        """A 402 that still offers payment (and a fresh sign-in), the refusal noted for the audit trail."""
        ctx.outcome = "reaccess_refused"
        ctx.record("reaccess_refused", reason=code, payer=payer, **fields)
        return PaymentChallenge(quote, code, message)
