"""Stages ``offer`` and ``challenge``: quote this request's price, and ask a call without payment to pay.

``offer`` reads which payment header came (v2 ``PAYMENT-SIGNATURE``, v1 ``X-PAYMENT``) and writes
``ctx.quote`` (the tool's offer bound to this request, in the client's protocol version) and
``ctx.paying``; a tool priced by a rule is quoted at its arguments' price (422 ``price_out_of_range``
or ``invalid_arguments`` when they have none). ``challenge`` answers a call that is not paying with its 402 and otherwise passes
it on (a sign-in to a tool with re-access goes on to ``reaccess`` too); a HEAD is never paid for: it gets the same offer as GET, and a payment on it is ignored.
The unpaid fast path keeps the 402 ``challenge`` renders and hands it back through ``issue``.
"""

from __future__ import annotations

import re

from starlette.responses import Response

from catalog import format_amount
from catalog.price_rules import PriceRuleError
from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import PAYMENT_SIGNATURE, X_PAYMENT, lower
from gateway.pipeline.context import RequestContext
from gateway.pipeline.stages.reaccess import signs_in
from gateway.protocol.challenge import PaymentChallenge
from gateway.protocol.offers import MAX_RESOURCE_URL, Quote, request_binding
from settlement.x402.wire import PaymentRequirements

__all__ = ["Challenge", "OfferStage", "challenge_issued"]

# A Host header as an offer's resource URL may carry it: a DNS name or IPv4, or an [IPv6], and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_PAYMENT_SIGNATURE = lower(PAYMENT_SIGNATURE)
_X_PAYMENT = lower(X_PAYMENT)


class OfferStage:
    name = "offer"
    shape_only = True  # for the requests the fast path takes: no payment header

    def __init__(self, public_url: str | None, challenge_body_version: int) -> None:
        self.public_url = public_url.rstrip("/") if public_url else None
        self.challenge_body_version = challenge_body_version

    async def __call__(self, ctx: RequestContext) -> Response | None:
        request, compiled = ctx.request, ctx.compiled
        assert request is not None and compiled is not None
        headers = request.headers
        header = headers.get(_PAYMENT_SIGNATURE)
        header_v1 = headers.get(_X_PAYMENT) if header is None else None
        version = 1 if header_v1 is not None else (2 if header is not None else self.challenge_body_version)
        resource_url = self._resource_url(ctx)
        try:  # a tool priced by a rule: the price of these arguments, before any 402
            offer = compiled.offer_for(ctx.arguments)
        except PriceRuleError as exc:
            code = codes.PRICE_OUT_OF_RANGE if exc.code == codes.PRICE_OUT_OF_RANGE else codes.INVALID_ARGUMENTS
            rule = compiled.tool.price_rule
            raise GatewayError(code, str(exc), fields=[{"field": name} for name in (rule.per if rule else ())]) from None
        binding = request_binding(ctx.method, ctx.path, ctx.query)
        ctx.quote = Quote(offer, offer.bound(binding), resource_url, version, binding)
        ctx.paying = (header is not None or header_v1 is not None) and ctx.method != "HEAD"
        return None

    def _resource_url(self, ctx: RequestContext) -> str:
        """This request's URL as its offer names it: on the public URL when one is set, else on the
        request's Host, which must be a plain host[:port] (no path, query, userinfo or fragment to
        smuggle into the offer). Refused (400, never a 5xx) when malformed or longer than an
        offer's resource may be."""
        request = ctx.request
        assert request is not None
        if self.public_url is None:
            host = request.headers.get("host")
            if host is not None and not _HOST.fullmatch(host):
                raise GatewayError(codes.INVALID_RESOURCE_URL, "the Host header is not a plain host[:port]")
        base = self.public_url or str(request.base_url).rstrip("/")
        resource_url = f"{base}{ctx.path}?{ctx.query}" if ctx.query else f"{base}{ctx.path}"
        if len(resource_url) > MAX_RESOURCE_URL:
            raise GatewayError(codes.INVALID_RESOURCE_URL, f"this request's URL is longer than the {MAX_RESOURCE_URL} "
                               "characters an offer's resource may name; shorten its Host, path or query",
                               limit=MAX_RESOURCE_URL)
        return resource_url


class Challenge:
    name = "challenge"
    shape_only = False  # its 402 is the shape's; noting it on the request is per request (``issue``)

    async def __call__(self, ctx: RequestContext) -> Response | None:
        if ctx.paying or signs_in(ctx):  # a payment, or a sign-in to a tool with re-access (``reaccess``)
            return None
        challenge = self.unpaid(ctx)
        return self.issue(ctx, challenge.code, challenge.to_response())

    @staticmethod
    def unpaid(ctx: RequestContext) -> PaymentChallenge:
        """The 402 of this call without payment: depends only on the request's shape."""
        assert ctx.quote is not None and ctx.compiled is not None
        tool = ctx.quote.offer.tool
        text = ctx.compiled.price_text if tool.price_rule is None else format_amount(tool.price_atomic, tool.payment.decimals)
        return PaymentChallenge.unpaid(ctx.quote, text)

    @staticmethod
    def issue(ctx: RequestContext, code: str, answer: Response) -> Response:
        """Answer ``ctx`` with a rendered 402 (``unpaid``'s, or the fast path's copy of it)."""
        assert ctx.quote is not None
        challenge_issued(ctx, ctx.quote.requirements)
        ctx.reason = code
        return answer


def challenge_issued(ctx: RequestContext, requirements: PaymentRequirements) -> None:
    """Note on the request that it is answered with an offer (the funnel's first step)."""
    ctx.outcome = "challenged"
    ctx.record("challenge_issued", amount=requirements.amount, asset=requirements.asset,
               network=requirements.network, payTo=requirements.pay_to)
