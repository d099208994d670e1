"""What a request to one tool needs, built once per tool and kept (offer, argument validator, price)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators

from catalog import PaymentTerms, Tool, format_amount, to_atomic
from catalog.models import PaymentOffer
from catalog.price_rules import PriceRuleError
from catalog.usage import UsageRule
from gateway.protocol.offers import Offer
from settlement.schemes.exact import exact_requirements
from settlement.schemes.upto import CHARGE_KEY, UPTO
from settlement.x402.wire import PaymentRequirements

__all__ = ["CompiledTool"]

MAX_PRICED_OFFERS = 256  # distinct prices of one rule-priced tool kept (an offer is a few KB)


def _multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    """``multipleOf`` in exact decimals: arguments and answers are read with ``parse_float=Decimal``
    and a schema's 0.01 is a float, which jsonschema's own check divides (Decimal / float: a 500 on
    every call); a quotient out of range (1E+9999999 % 0.01) is not a multiple, not an error."""
    if not validator.is_type(instance, "number"):
        return
    try:
        failed = Decimal(str(instance)) % Decimal(str(divisor)) != 0
    except ArithmeticError:
        failed = True
    if failed:
        yield ValidationError(f"{instance} is not a multiple of {divisor}")


# The tools' schemas as Draft 2020-12 has them, with an exact ``multipleOf``.
SchemaValidator: Any = validators.extend(Draft202012Validator, {"multipleOf": _multiple_of})  # type: ignore[no-untyped-call]


def _decimal(atomic: int, decimals: int) -> Decimal:
    return Decimal(format_amount(atomic, decimals))  # exact: a decimal string, no context rounding


def _charged_by_usage(
    requirements: Callable[[PaymentTerms, int], PaymentRequirements], usage: UsageRule
) -> Callable[[PaymentTerms, int], PaymentRequirements]:
    """Requirements whose ``extra.charge`` states the usage rule (the price is per unit) instead of
    a fixed charge: the amount is counted from the answer (stage ``meter``)."""

    def charged(terms: PaymentTerms, amount: int) -> PaymentRequirements:
        made = requirements(terms, amount)
        if made.scheme != UPTO:
            return made
        rule = usage.describe(_decimal(amount, terms.decimals))
        return made.model_copy(update={"extra": {**(made.extra or {}), CHARGE_KEY: rule}})

    return charged


def _above_maximum(tool: Tool, offers: tuple[PaymentOffer, ...], amounts: tuple[int, ...]) -> None:
    """Refuse a rule's price above an ``upto`` offer's signed maximum (``max_price``): that offer
    would ask the payer to sign less than the charge, which can never settle, so no offer is made
    and the upstream is never called for it. Raises ``PriceRuleError`` (422 ``price_out_of_range``)."""
    for offer, amount in zip(offers, amounts, strict=True):
        terms = offer.terms
        if terms.scheme != UPTO or terms.maximum is None or amount <= to_atomic(terms.maximum, terms.decimals):
            continue
        rule = tool.price_rule
        raise PriceRuleError(
            "price_out_of_range",
            f"{tool.name} costs {format_amount(amount, terms.decimals)} for these arguments, above its maximum "
            f"{terms.maximum:f} (max_price, what the payer signs for); ask for less"
            + (f" ({', '.join(rule.per)} set the price)" if rule is not None else ""),
        )


@dataclass(frozen=True, eq=False)
class CompiledTool:
    """What a request to one tool needs: its offer, argument validator and price text. Each is built
    on first use and kept, so a catalog of thousands of tools starts without compiling them all
    and the first request to a tool pays its build once. Tools with the same input schema share
    one validator (``validators``, one dict per pipeline)."""

    tool: Tool
    validators: dict[str, Draft202012Validator] = field(default_factory=dict, repr=False)
    # The offer's requirements from the tool's terms and price: the pipeline's ``Schemes.requirements``.
    scheme_requirements: Callable[[PaymentTerms, int], PaymentRequirements] = exact_requirements
    # A tool priced by a rule: its offers by their amounts (one per offer), the latest kept.
    priced: dict[tuple[int, ...], Offer] = field(default_factory=dict, repr=False)
    # Arguments (as canonical JSON) that passed ``validator``, the latest kept (stage ``arguments``).
    valid_arguments: dict[str, None] = field(default_factory=dict, repr=False)
    # Offers declare the payment-identifier extension required (X402GW_PAYMENT_IDENTIFIER=required).
    identifier_required: bool = field(default=False, kw_only=True)

    @cached_property
    def offer(self) -> Offer:
        tool, requirements = self.tool, self.scheme_requirements
        if tool.usage is not None:
            requirements = _charged_by_usage(requirements, tool.usage)
        alternatives = [requirements(offer.terms, offer.price_atomic) for offer in tool.alternatives]
        return Offer.for_tool(tool, requirements(tool.payment, tool.price_atomic), alternatives,
                              identifier_required=self.identifier_required)

    def offer_for(self, arguments: Mapping[str, Any]) -> Offer:
        """The offer of a call with these arguments: ``offer``, or for a tool priced by a rule
        (``catalog.price_rules``) the offer of the tool at the rule's price of ``arguments`` on every
        offer, each in its token's decimals. Raises ``PriceRuleError``, also for a price above an
        ``upto`` offer's signed maximum. Offers are kept per price."""
        rule = self.tool.price_rule
        if rule is None:
            return self.offer
        tool = self.tool
        amounts = tuple(rule.atomic(arguments, offer.terms.decimals) for offer in tool.offers)
        offer = self.priced.get(amounts)
        if offer is None:
            _above_maximum(tool, tool.offers, amounts)  # before any offer: an upto maximum is never below the price
            first, *others = amounts
            priced = tool.model_copy(update={
                "price": _decimal(first, tool.payment.decimals),
                "alternatives": tuple(o.model_copy(update={"price": _decimal(a, o.terms.decimals)})
                                      for o, a in zip(tool.alternatives, others, strict=True)),
            })
            requirements = self.scheme_requirements
            offer = Offer.for_tool(priced, requirements(priced.payment, first),
                                   [requirements(o.terms, a) for o, a in zip(priced.alternatives, others, strict=True)],
                                   identifier_required=self.identifier_required)
            if len(self.priced) >= MAX_PRICED_OFFERS:
                del self.priced[next(iter(self.priced))]  # the oldest
            self.priced[amounts] = offer
        return offer

    @cached_property
    def validator(self) -> Draft202012Validator:
        schema = self.tool.input_schema
        key = json.dumps(schema, default=repr)  # in the schema's own key order: errors come in it
        validator = self.validators.get(key)
        if validator is None:
            validator = self.validators[key] = SchemaValidator(schema)
        return validator

    @cached_property
    def output_validator(self) -> Draft202012Validator | None:
        """The tool's output_schema compiled once (answers.drift checks every answer against it)."""
        schema = self.tool.output_schema
        if not schema or self.tool.answers is None or self.tool.answers.drift is None:
            return None
        key = "output:" + json.dumps(schema, default=repr)
        validator = self.validators.get(key)
        if validator is None:
            validator = self.validators[key] = SchemaValidator(schema)
        return validator

    @cached_property
    def price_text(self) -> str:
        return format_amount(self.tool.price_atomic, self.tool.payment.decimals)
