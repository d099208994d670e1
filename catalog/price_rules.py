"""Dynamic prices: a tool's price as a rule over its arguments, computed exactly for each request
before its 402 and bound into the offer (the offer's ``amount`` is what verify checks, the ledger
records and the budgets reserve).

Catalog syntax (``price:`` of a tool, instead of one amount)::

    price: {per: symbols, each: "$0.001"}                    # $0.001 per item of the array symbols
    price: {base: "$0.01", per: pages, each: "$0.002"}       # $0.01 + $0.002 per page (an integer)
    price: {per: [items, quantity], each: "0.0005"}          # per item x quantity (counts multiply)
    price:                                                   # by tiers of the count: the first
      per: pages                                             # tier whose up_to holds it; the last
      tiers:                                                 # may leave up_to out (no limit)
        - {up_to: 10, price: "$0.01"}
        - {up_to: 100, price: "$0.05"}
        - {price: "$0.20"}

``per`` names required arguments of ``input_schema``, each an array (its count is its length) or an
integer with ``minimum`` >= 0 (its value), so a fractional or negative count is refused with the
arguments (422), before any price. The amounts are a token amount or dollars, all of a rule alike.
Loader codes: ``invalid_price_rule``, ``price_unknown_argument``, ``price_argument_not_count``,
``price_argument_optional`` (and ``price_precision``, ``price_above_max`` as for a fixed price; for
an ``upto`` offer also the rule's highest price, where the schema bounds the count, above its
``max_price``: what the payer signs for. An unbounded count priced above it is refused per request).
Request codes (``PriceRuleError``): ``price_out_of_range`` (no tier holds the count, a price of 0,
or beyond uint256), ``invalid_arguments`` (a count the schema should have refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pydantic import Field, field_validator

from catalog.fields import Dollars, FrozenModel, PriceRef
from catalog.pricing import format_amount, to_atomic

__all__ = [
    "PriceRule", "PriceRuleDoc", "PriceRuleError", "PriceTier", "PriceTierDoc", "build_rule", "ceiling_problems",
    "highest_price", "precision_problems", "rule_problems",
]

MAX_UINT256 = 2**256 - 1
Problem = tuple[str, str, str]  # (field under ``price``, code, message)


class PriceRuleError(ValueError):
    """A request whose arguments the rule cannot price; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PriceTierDoc(FrozenModel):
    up_to: int | None = Field(default=None, ge=0, strict=True)
    price: PriceRef


class PriceRuleDoc(FrozenModel):
    per: tuple[str, ...]
    base: PriceRef | None = None
    each: PriceRef | None = None
    tiers: tuple[PriceTierDoc, ...] | None = None

    @field_validator("per", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class PriceTier(FrozenModel):
    up_to: int | None  # None: every count above the previous tier
    price: Decimal


class PriceRule(FrozenModel):
    """``base`` + (``each`` x count, or the price of the count's tier); count: the product of the
    ``per`` arguments' counts. Amounts are token amounts, or dollars when ``dollars``."""

    per: tuple[str, ...]
    base: Decimal = Decimal(0)
    each: Decimal | None = None
    tiers: tuple[PriceTier, ...] = ()
    dollars: bool = False

    def count(self, arguments: Mapping[str, Any]) -> int:
        count = 1
        for name in self.per:
            value = arguments.get(name)
            if isinstance(value, list):
                count *= len(value)
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                count *= value
            else:
                raise PriceRuleError("invalid_arguments", f"{name} must be a whole number >= 0 or a list: it sets the price")
        return count

    def units(self, count: int) -> Decimal:
        """The price of ``count`` in the rule's unit (exact: integer times a short decimal)."""
        if self.each is not None:
            return self.base + self.each * count
        for tier in self.tiers:
            if tier.up_to is None or count <= tier.up_to:
                return self.base + tier.price
        raise PriceRuleError("price_out_of_range",
                             f"{count} {self._counted()} is more than the largest tier ({self.tiers[-1].up_to}) sells")

    def atomic(self, arguments: Mapping[str, Any], decimals: int) -> int:
        """The price of these arguments in atomic units of a token with ``decimals``."""
        count = self.count(arguments)
        if self.each is not None:  # integers all the way: no Decimal context can round
            amount = to_atomic(self.base, decimals) + to_atomic(self.each, decimals) * count
        else:
            amount = to_atomic(self.units(count), decimals)
        if amount <= 0:
            raise PriceRuleError("price_out_of_range", f"{count} {self._counted()} costs nothing: nothing is sold for 0")
        if amount > MAX_UINT256:
            raise PriceRuleError("price_out_of_range", f"{count} {self._counted()} is a price beyond any token amount")
        return amount

    @property
    def reference(self) -> Decimal:
        """The price of a count of 1: what the static checks (precision, ceilings) and a listing's
        "from" read. Dollars when the rule is."""
        value = self.units(1)
        return Dollars(value) if self.dollars else value

    def amounts(self) -> list[tuple[str, Decimal]]:
        """Every amount written in the rule, with its field under ``price``."""
        found = [("base", self.base)] if self.base else []
        if self.each is not None:
            found.append(("each", self.each))
        found += [(f"tiers[{i}].price", tier.price) for i, tier in enumerate(self.tiers)]
        return found

    def describe(self, decimals: int | None = None) -> dict[str, Any]:
        """The rule as discovery shows it (``priceRule``): amounts as decimal strings, in dollars
        (``currency: USD``) or in the offer's token."""
        def text(value: Decimal) -> str:
            return format_amount(to_atomic(value, decimals), decimals) if decimals is not None else f"{value.normalize():f}"
        rule: dict[str, Any] = {"per": list(self.per), "base": text(self.base)}
        if self.each is not None:
            rule["each"] = text(self.each)
        else:
            rule["tiers"] = [{"upTo": tier.up_to, "price": text(tier.price)} for tier in self.tiers]
        if self.dollars:
            rule["currency"] = "USD"
        return rule

    def sentence(self, unit: str) -> str:
        """In words, e.g. ``0.01 USDC plus 0.002 USDC per pages``; ``unit``: the token's symbol."""
        def money(value: Decimal) -> str:
            return f"${value.normalize():f}" if self.dollars else f"{value.normalize():f} {unit}"
        counted = self._counted()
        if self.each is not None:
            text = f"{money(self.each)} per {counted}"
        else:
            steps = [f"{money(t.price)} up to {t.up_to}" if t.up_to is not None else f"{money(t.price)} above"
                     for t in self.tiers]
            text = f"by {counted}: " + ", ".join(steps)
        return f"{money(self.base)} plus {text}" if self.base else text

    def _counted(self) -> str:
        return " x ".join(self.per)


def _count_problems(doc: PriceRuleDoc, input_schema: Mapping[str, Any]) -> list[Problem]:
    properties = input_schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = input_schema.get("required")
    required = required if isinstance(required, list) else []
    problems: list[Problem] = []
    for name in doc.per:
        schema = properties.get(name)
        if not isinstance(schema, dict):
            problems.append(("per", "price_unknown_argument",
                             f"{name!r} is not an argument of this tool (input_schema.properties: "
                             f"{', '.join(map(str, properties)) or 'none'})"))
            continue
        kind = schema.get("type")
        minimum = schema.get("minimum")
        counts = kind == "array" or (kind == "integer" and isinstance(minimum, (int, Decimal)) and not isinstance(minimum, bool)
                                      and minimum >= 0)
        if not counts:
            problems.append(("per", "price_argument_not_count",
                             f"{name!r} must be an array or an integer with minimum >= 0 to count a price "
                             f"(type {kind!r}, minimum {minimum!r})"))
        if name not in required:
            problems.append(("per", "price_argument_optional",
                             f"{name!r} sets the price: list it in input_schema.required, so no call leaves it to the upstream's default"))
    return problems


def _shape_problems(doc: PriceRuleDoc) -> list[Problem]:
    if not doc.per or len(set(doc.per)) != len(doc.per):
        return [("per", "invalid_price_rule", "per names at least one argument, each once")]
    if (doc.each is None) == (doc.tiers is None):
        return [("price", "invalid_price_rule", "a price rule has either each (a price per unit) or tiers, not both or neither")]
    problems: list[Problem] = []
    tiers = doc.tiers or ()
    if doc.tiers is not None and not tiers:
        problems.append(("tiers", "invalid_price_rule", "tiers lists at least one tier"))
    previous = -1
    for index, tier in enumerate(tiers):
        last = index == len(tiers) - 1
        if tier.up_to is None and not last:
            problems.append((f"tiers[{index}].up_to", "invalid_price_rule", "only the last tier may leave up_to out"))
        elif tier.up_to is not None and tier.up_to <= previous:
            problems.append((f"tiers[{index}].up_to", "invalid_price_rule", f"up_to must grow from tier to tier (after {previous})"))
        previous = tier.up_to if tier.up_to is not None else previous
    if len(tiers) == 1 and tiers[0].up_to == 0:
        problems.append(("tiers", "invalid_price_rule", "a rule that sells only a count of 0 sells nothing"))
    written = [a for a in (doc.base, doc.each, *(t.price for t in tiers)) if a is not None]
    if len({isinstance(a, Dollars) for a in written}) > 1:
        problems.append(("price", "invalid_price_rule", "a rule's amounts are all dollars (\"$0.01\") or all token amounts"))
    return problems


def build_rule(doc: PriceRuleDoc, input_schema: Mapping[str, Any]) -> tuple[PriceRule | None, list[Problem]]:
    """The rule of a tool's ``price:`` mapping and its problems (fields under ``price``)."""
    problems = _shape_problems(doc)
    if problems:
        return None, problems
    problems = _count_problems(doc, input_schema)
    tiers = tuple(PriceTier(up_to=t.up_to, price=Decimal(t.price)) for t in doc.tiers or ())
    dollars = any(isinstance(a, Dollars) for a in (doc.base, doc.each, *(t.price for t in doc.tiers or ())))
    rule = PriceRule(per=doc.per, base=Decimal(doc.base or 0), each=None if doc.each is None else Decimal(doc.each),
                     tiers=tiers, dollars=dollars)
    return (None if problems else rule), problems


def precision_problems(rule: PriceRule, decimals: int, where: str = "price") -> list[Problem]:
    """Amounts of ``rule`` that are not whole atomic units of a token with ``decimals``."""
    problems: list[Problem] = []
    for field, value in rule.amounts():
        try:
            to_atomic(value, decimals)
        except ValueError:
            problems.append((f"{where}.{field}", "price_precision",
                             f"{value:f} has more digits than the token's {decimals} decimals"))
    return problems


def _most(schema: Any) -> int | None:
    """The largest count an argument's schema allows: an array's ``maxItems``, an integer's
    ``maximum`` (or ``exclusiveMaximum`` less one); None when it sets no bound."""
    if not isinstance(schema, dict):
        return None
    bounds = [schema.get("maxItems")] if schema.get("type") == "array" else [schema.get("maximum")]
    if schema.get("type") == "integer" and isinstance(schema.get("exclusiveMaximum"), (int, Decimal)):
        bounds.append(schema["exclusiveMaximum"] - 1)
    found = [int(b) for b in bounds if isinstance(b, (int, Decimal)) and not isinstance(b, bool) and b == int(b)]
    return max(min(found), 0) if found else None


def highest_price(rule: PriceRule, input_schema: Mapping[str, Any]) -> tuple[Decimal, int | None] | None:
    """The most ``rule`` can price a call whose arguments ``input_schema`` admits, with the largest
    count that schema allows (None: no bound, the tiers' top price is the highest); None when the
    count is unbounded and every unit costs (``each``): only the request's arguments can tell."""
    properties = input_schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    count: int | None = 1
    for name in rule.per:
        most = _most(properties.get(name))
        count = None if most is None or count is None else count * most
    if rule.each is not None:
        return None if count is None else (rule.base + rule.each * count, count)
    reachable, lowest = [], 0
    for tier in rule.tiers:
        if count is None or lowest <= count:
            reachable.append(tier.price)
        lowest = tier.up_to + 1 if tier.up_to is not None else lowest
    return (rule.base + max(reachable), count) if reachable else None


def ceiling_problems(rule: PriceRule, input_schema: Mapping[str, Any], maximum: Decimal | None) -> list[Problem]:
    """The rule's highest price above an ``upto`` offer's ``maximum`` (the most its payer signs
    for), where the schema bounds it: such a call could never be paid, so the catalog is refused."""
    highest = highest_price(rule, input_schema) if maximum is not None else None
    if maximum is None or highest is None or highest[0] <= maximum:
        return []
    price, count = highest
    counted = f"{rule._counted()} up to {count}" if count is not None else f"the top tier of {rule._counted()}"
    return [("price", "price_above_max",
             f"this rule prices a call at up to {price.normalize():f} ({counted}), above max_price {maximum:f}, the most an "
             "upto payer signs for: lower the rule, bound the count in input_schema (maximum, maxItems) or raise max_price")]


def rule_problems(rule: PriceRule, input_schema: Mapping[str, Any], decimals: int, maximum: Decimal | None) -> list[Problem]:
    """The rule's problems with one offer's terms: its precision in the token's ``decimals``, and
    its highest price against the offer's upto ``maximum`` (``ceiling_problems``)."""
    return [*precision_problems(rule, decimals), *ceiling_problems(rule, input_schema, maximum)]
