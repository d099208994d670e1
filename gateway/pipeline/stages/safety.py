"""The safety stages: where the chain asks ``gateway.safety.checks.Safety`` what an agent may do.

``header_limits`` (431) runs before the body is read; ``pre_challenge_safety`` (kill switch, price
guard, circuit breaker: 503; per-client rate limit: 429, every request, paid or not) before any
402; ``payer_checks`` (payer lists: 403) on the signer recovered offline, before any lookup;
``reserve`` (per-payer and per-tool rate limits: 429; budgets: 403) after verify. What they hold is
given back by the ``release_holds`` finalizer.
"""

from __future__ import annotations

from typing import cast

from starlette.responses import Response

from gateway.pipeline.context import RequestContext
from gateway.safety.checks import Safety

__all__ = ["HeaderLimits", "PayerChecks", "PreChallengeSafety", "Reserve"]


class HeaderLimits:
    name = "header_limits"
    shape_only = False

    def __init__(self, safety: Safety) -> None:
        self.safety = safety

    async def __call__(self, ctx: RequestContext) -> Response | None:
        self.safety.check_headers(cast(list[tuple[bytes, bytes]], ctx.raw_headers))
        return None


class PreChallengeSafety:
    name = "pre_challenge_safety"
    shape_only = False

    def __init__(self, safety: Safety) -> None:
        self.safety = safety

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote = ctx.tool, ctx.quote
        assert tool is not None and quote is not None
        await self.safety.before_challenge(ctx, tool, int(quote.requirements.amount))
        # Every request, paid or not, spends its client's tokens: a payment header is no pass.
        await self.safety.per_client(ctx, tool)
        return None


class PayerChecks:
    name = "payer_checks"
    shape_only = False

    def __init__(self, safety: Safety) -> None:
        self.safety = safety

    async def __call__(self, ctx: RequestContext) -> Response | None:
        assert ctx.tool is not None and ctx.paid is not None
        # Tokens wait for verify (``Reserve``): a fresh unfunded key must not spend the tool's, nor a
        # settled payment's public signature, replayed, its payer's.
        await self.safety.before_verify(ctx, ctx.tool, ctx.paid.signer, per_payer=False)
        return None


class Reserve:
    name = "reserve"
    shape_only = False

    def __init__(self, safety: Safety) -> None:
        self.safety = safety

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid = ctx.tool, ctx.quote, ctx.paid
        assert tool is not None and quote is not None and paid is not None
        await self.safety.per_tool(ctx, tool, ctx.payer or paid.signer)  # after verify: only funded payments spend tokens
        await self.safety.reserve(ctx, tool, ctx.payer or paid.signer, int(quote.requirements.amount))
        return None
