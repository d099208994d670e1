"""The checks an offer must pass before the agent signs anything.

Each refusal is (kind, message): kind "offer" (the offer differs from what the agent trusts or was
promised) or "limit" (paying would break the agent's own limits).
"""

from __future__ import annotations

from catalog import format_amount
from gateway.devkit.agent.tokens import ADDRESS, TokenFacts
from settlement.x402.wire import PaymentRequirements

__all__ = ["PaymentRefused", "SpendLimitExceeded", "UntrustedOffer", "offer_problem"]


class PaymentRefused(Exception):
    """The agent would not sign: the message says why. Nothing was signed."""


class SpendLimitExceeded(PaymentRefused):
    """Paying would break the per-call cap or the total budget."""


class UntrustedOffer(PaymentRefused):
    """The offer's network, asset, token name/version or payee is not what the agent trusts."""



def offer_problem(
    option: PaymentRequirements,
    token: TokenFacts,
    *,
    spent: int,
    max_spend: int,
    max_per_call: int,
    expect_pay_to: str | None = None,
    expect_max_amount: int | None = None,
) -> tuple[str, str] | None:
    """Why ``option`` is refused, as (kind, message), or None when it can be signed."""

    def fmt(atomic: int) -> str:
        return format_amount(atomic, token.decimals)

    if option.scheme != "exact":
        return "offer", f"scheme {option.scheme!r} is not supported (only exact)"
    if option.network != token.network:
        return "offer", f"network {option.network} is not the agent's ({token.network})"
    if not ADDRESS.fullmatch(option.asset) or option.asset.lower() != token.address.lower():
        return "offer", f"asset {option.asset} is not the agent's token ({token.address} on {token.network})"
    extra = option.extra or {}
    method = extra.get("assetTransferMethod")
    if method not in (None, "eip3009"):
        return "offer", f"asset transfer method {method!r} is not supported (only eip3009)"
    if extra.get("name") != token.name or extra.get("version") != token.version:
        return "offer", (
            f"the offer names the token {extra.get('name')!r} version {extra.get('version')!r}; "
            f"the chain says {token.name!r} version {token.version!r} ({token.source})"
        )
    if not ADDRESS.fullmatch(option.pay_to) or int(option.pay_to, 16) == 0:
        return "offer", f"payTo {option.pay_to!r} is not an address"
    if expect_pay_to is not None and option.pay_to.lower() != expect_pay_to.lower():
        return "offer", f"the offer's payTo {option.pay_to} is not the advertised {expect_pay_to}"
    if option.max_timeout_seconds < 1:
        return "offer", f"maxTimeoutSeconds {option.max_timeout_seconds} leaves no time to pay"
    amount = int(option.amount)
    if expect_max_amount is not None and amount > expect_max_amount:
        return "offer", (
            f"the offer asks {fmt(amount)}, more than the advertised price {fmt(expect_max_amount)}"
        )
    if amount > max_spend - spent:
        return "limit", (
            f"paying {fmt(amount)} would exceed the spend limit "
            f"({fmt(spent)} of {fmt(max_spend)} spent)"
        )
    if amount > max_per_call:
        return "limit", f"paying {fmt(amount)} would exceed the per-call limit ({fmt(max_per_call)})"
    return None
