"""Usage-based charges for ``upto`` tools: the amount settled is computed from what the call used,
read from the upstream's answer, never more than the maximum the payer signed.

Catalog syntax (a tool paid with ``payment: {scheme: upto}``; ``price`` is then the price of one
unit, ``max_price`` the most one call may charge)::

    price: "0.00002"                  # per unit (per token, per row...)
    max_price: "0.05"                 # the maximum the payer signs for
    settle: after                     # usage is known once the upstream answered
    usage:
      from: json                      # header | json | element | events | event_field | bytes
      pointer: /usage/total_tokens    # from: json (RFC 6901) or event_field (in each SSE event's JSON)
      # header: X-Usage-Units         # from: header
      # element: Usage/Tokens         # from: element, a SOAP tool: the path of element names in its answer
      base: "0.001"                   # charged on every served call beside the units (default 0)
      per_units: 1000                 # the price is per this many units; the charge rounds up (default 1)
      default: 0                      # units when the answer has no readable usage; left out: fail closed
      partial: delivered              # streams: a client gone or an upstream failing mid-stream is
                                      # charged what was delivered (default), or nothing

Sources: ``header``/``json``/``element`` read a buffered answer; ``events`` (SSE data events),
``bytes`` (body bytes) and ``event_field`` (the last value of ``pointer`` seen in an event's JSON,
counted as it streams) need ``stream: true``. The charge is ``base + ceil(price x units /
per_units)`` in atomic units, capped at the maximum (the answer then says ``capped``); zero units
and no base settle nothing. A usage that is missing or not a whole number >= 0 takes ``default``,
or fails closed: the answer is withheld, nothing is charged, and the reason is recorded
(``usage_missing``, ``usage_not_a_number``, ``usage_negative``, ``usage_fractional``,
``usage_too_large``). Loader codes: ``invalid_usage_rule``, ``usage_needs_upto``,
``usage_needs_settle_after``, ``usage_needs_stream``, ``usage_with_price_rule``,
``upto_max_below_minimum``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from pydantic import ConfigDict, Field

from catalog.fields import FrozenModel, Price
from catalog.pricing import to_atomic

__all__ = [
    "STREAM_SOURCES", "Charge", "UsageError", "UsageRule", "parse_units", "stream_problems",
    "usage_problems",
]

UsageSource = Literal["header", "json", "element", "events", "event_field", "bytes"]
STREAM_SOURCES = frozenset({"events", "event_field", "bytes"})
MAX_UNITS = 2**128  # more units than any answer reports: a usage above it is a lie, refused
_DIGITS = re.compile(r"[0-9]{1,40}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")
Problem = tuple[str, str, str]  # (field under ``usage``, code, message)


class UsageError(ValueError):
    """An answer whose usage cannot be read; ``code`` is stable (``usage_*``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UsageRule(FrozenModel):
    """How one call's units are read and what they cost (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, populate_by_name=True)

    source: UsageSource = Field(alias="from")
    header: str | None = None
    pointer: str | None = None
    element: str | None = None
    base: Price | None = None
    per_units: int = Field(default=1, ge=1, le=10**18, strict=True)
    default: int | None = Field(default=None, ge=0, strict=True)
    partial: Literal["delivered", "nothing"] = "delivered"

    @property
    def json_pointer(self) -> str | None:
        """Where the units are in a JSON document: ``pointer``, or a SOAP ``element`` path as the
        pointer into the answer the SOAP bridge made of it."""
        if self.element is not None:
            return "/" + "/".join(part for part in self.element.split("/") if part)
        return self.pointer

    def charge(self, units: int, *, price: Decimal, decimals: int, maximum: int) -> Charge:
        """The charge of ``units`` in atomic units of a token with ``decimals``, capped at ``maximum``."""
        each = to_atomic(price, decimals)
        base = to_atomic(self.base, decimals) if self.base is not None else 0
        computed = base + -(-each * units // self.per_units)  # rounded up to a whole atomic unit
        return Charge(basis="usage", units=units, computed=computed, amount=min(computed, maximum), maximum=maximum)

    def describe(self, price: Decimal) -> dict[str, Any]:
        """The rule as the offer's ``extra.charge`` and discovery state it (decimal strings)."""
        rule: dict[str, Any] = {"basis": "usage", "from": self.source, "pricePerUnit": f"{price.normalize():f}"}
        for key, value in (("header", self.header), ("pointer", self.json_pointer if self.source != "header" else None)):
            if value is not None:
                rule[key] = value
        if self.base is not None:
            rule["base"] = f"{self.base.normalize():f}"
        if self.per_units != 1:
            rule["perUnits"] = self.per_units
        if self.default is not None:
            rule["defaultUnits"] = self.default
        return rule


@dataclass(frozen=True, slots=True)
class Charge:
    """What one call is charged: ``amount`` atomic units (``computed`` capped at ``maximum``)."""

    basis: str  # "usage" | "price"
    units: int | None
    computed: int
    amount: int
    maximum: int
    defaulted: bool = False  # the answer had no readable usage: the rule's default was charged

    @property
    def capped(self) -> bool:
        return self.computed > self.maximum

    def describe(self) -> dict[str, Any]:
        """``extra.charge`` of the settlement: decimal strings for amounts."""
        out: dict[str, Any] = {"basis": self.basis, "amount": str(self.amount), "maximum": str(self.maximum),
                               "capped": self.capped}
        if self.units is not None:
            out["units"] = str(self.units)
        if self.capped:
            out["computed"] = str(self.computed)
        if self.defaulted:
            out["defaulted"] = True
        return out


def parse_units(value: Any) -> int:
    """A usage value as a whole number of units: a JSON integer or a string of digits. Raises
    ``UsageError`` for anything else (a float, a negative, a fraction, a word, a huge number)."""
    if isinstance(value, bool) or value is None:
        raise UsageError("usage_not_a_number" if value is not None else "usage_missing",
                         f"the usage {value!r} is not a whole number of units")
    if isinstance(value, int):
        number = value
    elif isinstance(value, (float, Decimal)):
        code = "usage_negative" if value < 0 else "usage_fractional"
        raise UsageError(code, f"the usage {value} is not a whole number >= 0 of units")
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
            raise UsageError("usage_negative", f"the usage {text!r} is negative")
        if re.fullmatch(r"-?[0-9]+\.[0-9]+|-?[0-9.]+[eE][-+]?[0-9]+", text):
            raise UsageError("usage_fractional", f"the usage {text!r} is not a whole number of units")
        if not _DIGITS.fullmatch(text):
            raise UsageError("usage_not_a_number", f"the usage {text[:40]!r} is not a number")
        number = int(text)
    else:
        raise UsageError("usage_not_a_number", f"the usage is a {type(value).__name__}, not a number")
    if number < 0:
        raise UsageError("usage_negative", f"the usage {number} is negative")
    if number > MAX_UNITS:
        raise UsageError("usage_too_large", "the usage is beyond any plausible count of units")
    return number


def usage_problems(rule: UsageRule, *, scheme: str, settle: str, stream: bool, kind: str, has_price_rule: bool,
                   maximum: Decimal | None, decimals: int) -> list[Problem]:
    """What is wrong with a tool's ``usage`` rule in its context (fields under ``usage``)."""
    problems: list[Problem] = []
    wanted = {"header": rule.header, "json": rule.pointer, "event_field": rule.pointer, "element": rule.element}
    if rule.source in wanted and not wanted[rule.source]:
        field = {"header": "header", "element": "element"}.get(rule.source, "pointer")
        problems.append((field, "invalid_usage_rule", f"from: {rule.source} needs {field}"))
    extra = [name for name, value in (("header", rule.header), ("pointer", rule.pointer), ("element", rule.element))
             if value is not None and wanted.get(rule.source) is not value]
    if extra:
        problems.append((extra[0], "invalid_usage_rule", f"{extra[0]} is not used by from: {rule.source}"))
    if rule.header is not None and not _HEADER_NAME.fullmatch(rule.header):
        problems.append(("header", "invalid_usage_rule", f"{rule.header!r} is not a header name"))
    if rule.pointer is not None and rule.pointer and not rule.pointer.startswith("/"):
        problems.append(("pointer", "invalid_usage_rule", "a JSON pointer starts with / (RFC 6901), e.g. /usage/total_tokens"))
    if rule.source == "element" and kind != "soap":
        problems.append(("from", "invalid_usage_rule", "from: element reads a SOAP tool's answer; use from: json for REST"))
    if scheme != "upto":
        problems.append(("from", "usage_needs_upto",
                         "a usage-based charge is settled in the upto scheme: add payment: {scheme: upto} and a max_price"))
    if settle != "after":
        problems.append(("from", "usage_needs_settle_after",
                         "usage is known only once the upstream answered: write settle: after on this tool"))
    if (rule.source in STREAM_SOURCES) != stream:
        problems.append(("from", "usage_needs_stream",
                         f"from: {rule.source} {'counts a stream: set stream: true' if not stream else 'reads a buffered answer; a stream is counted by events, event_field or bytes'}"))
    if has_price_rule:
        problems.append(("from", "usage_with_price_rule", "a tool is charged by its usage or by a price rule, not both"))
    problems += _amount_problems(rule, maximum, decimals)
    return problems


def _amount_problems(rule: UsageRule, maximum: Decimal | None, decimals: int) -> list[Problem]:
    problems: list[Problem] = []
    try:
        minimum = to_atomic(rule.base, decimals) if rule.base is not None else 0
    except ValueError:
        return [("base", "price_precision", f"{rule.base:f} has more digits than the token's {decimals} decimals")]
    if maximum is not None and minimum > to_atomic(maximum, decimals):
        problems.append(("base", "upto_max_below_minimum",
                         f"max_price {maximum:f} is below the charge of every served call (base {rule.base:f})"))
    return problems


def stream_problems(*, kind: str, scheme: str, settle: str, usage: UsageRule | None, answers: bool,
                    failure_rules: bool) -> list[Problem]:
    """What is wrong with ``stream: true`` on a tool (fields of the tool). An ``exact`` stream is
    settled before the upstream is called (``settle: upfront``, its default): paid content never
    goes out before its settlement is final. An ``upto`` stream is charged by a usage rule counted
    from the stream, settled when it ends."""
    problems: list[Problem] = []
    if kind != "rest":
        problems.append(("stream", "stream_needs_rest", "only a REST upstream's answer is relayed as a stream"))
    if answers:
        problems.append(("answers", "stream_with_answers", "a streamed answer is not checked against a schema nor trimmed: drop answers"))
    if failure_rules:
        problems.append(("failure_when", "stream_with_failure_rules", "failure rules read a whole answer; a stream is relayed as it comes"))
    if scheme == "upto" and usage is None:
        problems.append(("usage", "stream_needs_usage", "an upto stream is charged by a usage rule: usage: {from: events | event_field | bytes}"))
    if scheme != "upto" and settle != "upfront":
        problems.append(("settle", "stream_settles_upfront",
                         "an exact stream is settled before it starts (paid content never goes out before its settlement is final): "
                         "leave settle out or write settle: upfront"))
    return problems
