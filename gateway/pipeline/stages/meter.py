"""Stage ``meter``: what an ``upto`` call is charged, from what it used.

For a tool with a ``usage`` rule (``catalog.usage``) and a buffered answer, the units are read from
the upstream's answer (a header, a JSON pointer, a SOAP element) and priced, capped at the maximum
the payer signed; the quote's requirements then carry that charge (``extra.charge``), which
``settle`` settles and the ledger writes ahead. An answer whose usage cannot be read takes the
rule's ``default``, or fails closed: withheld (502 ``usage_unreadable``), the payment voided,
nothing charged, the reason recorded. Streams are counted as they are relayed (``stream``).
"""

from __future__ import annotations

from dataclasses import replace

from starlette.responses import Response

from catalog.usage import Charge, UsageRule
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.protocol.offers import Quote
from gateway.upstream.usage import UsageError, read_units
from settlement.ledger import Ledger
from settlement.schemes.upto import CHARGE_KEY

__all__ = ["Meter", "charge_of", "with_charge"]


def charge_of(rule: UsageRule, quote: Quote, units: int, *, defaulted: bool = False) -> Charge:
    """The charge of ``units`` under ``rule`` for the offer the payer chose."""
    tool = quote.tool
    charge = rule.charge(units, price=tool.price, decimals=tool.payment.decimals, maximum=int(quote.requirements.amount))
    return replace(charge, defaulted=True) if defaulted else charge


def with_charge(quote: Quote, charge: Charge) -> Quote:
    """The quote whose requirements settle ``charge`` (``extra.charge``, read by the upto scheme)."""
    requirements = quote.requirements
    extra = {**(requirements.extra or {}), CHARGE_KEY: charge.describe()}
    return replace(quote, requirements=requirements.model_copy(update={"extra": extra}))


class Meter:
    name = "meter"
    shape_only = False

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, quote, paid, payment_id = ctx.tool, ctx.quote, ctx.paid, ctx.payment_id
        assert tool is not None and quote is not None and paid is not None and payment_id is not None
        rule = tool.usage
        if rule is None or tool.stream:
            return None
        upstream = paid.upstream
        assert upstream is not None
        try:
            units, defaulted = read_units(rule, upstream), False
        except UsageError as err:
            if rule.default is None:
                await self.ledger.run(self.ledger.void, payment_id, err.code, upstream_status=upstream.status)
                ctx.record("usage_unreadable", paymentId=payment_id, reason=err.code, detail=str(err))
                ctx.outcome = "upstream_error"
                raise GatewayError(
                    "usage_unreadable",
                    f"the upstream's answer does not say how much was used ({err}); it is not served and nothing was charged",
                    status=502, retryable=False, reason=err.code, paymentId=payment_id,
                ) from None
            units, defaulted = rule.default, True
            ctx.record("usage_defaulted", paymentId=payment_id, reason=err.code, units=units)
        charge = charge_of(rule, quote, units, defaulted=defaulted)
        ctx.quote = with_charge(quote, charge)
        ctx.record("usage_counted", paymentId=payment_id, **charge.describe())
        return None
