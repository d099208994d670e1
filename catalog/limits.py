"""Safety limits an owner writes in a catalog: spend budgets, rate limits, a price ceiling and the
circuit breaker of each upstream. Also parses the compact forms used in settings
(``"5.00/1d"`` for a budget, ``"10/1s"`` for a rate limit).

Catalog syntax (catalog level applies to every tool of the catalog; tool level to that tool;
every level that sets a limit is enforced, each with its own counter)::

    max_price: "0.05"                 # a price above it is refused at load
    budgets:
      per_payer: {amount: "5.00", window: 1d}          # spend of one payer
      per_payer_per_tool: {amount: "1.00", window: 1h}  # spend of one payer on each tool
      per_owner: {amount: "500", window: 1d}            # spend of all payers together
    rate_limits:
      per_payer: {requests: 10, window: 1s, burst: 20}  # paid requests of one payer
      per_tool: {requests: 100, window: 1s}             # paid requests to each tool
      per_client: {requests: 60, window: 1m}            # unpaid requests per client address
    upstreams:
      legacy:
        base_url: ...
        breaker: {failures: 5, window_seconds: 30, cooldown_seconds: 10}

Windows are ``<n>s|m|h|d`` or an integer of seconds; budget windows are aligned to the epoch
(``1d`` resets at 00:00 UTC).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

__all__ = ["Breaker", "Budget", "Budgets", "RateLimit", "RateLimits", "parse_budget", "parse_rate_limit", "parse_window"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_WINDOW = re.compile(r"([1-9][0-9]{0,6})\s*([smhdw]?)")
MAX_WINDOW_SECONDS = 366 * 86_400


def _fail(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{detail}", {"detail": message})


def parse_window(value: Any) -> int:
    """``"1d"`` → 86400; an int is seconds. ValueError with a readable reason otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"window must be like 30s, 5m, 1h or 1d, got {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (match := _WINDOW.fullmatch(value.strip())):
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"window must be like 30s, 5m, 1h or 1d, got {value!r}")
    if not 1 <= seconds <= MAX_WINDOW_SECONDS:
        raise ValueError(f"window must be between 1 second and 366 days, got {value!r}")
    return seconds


def _window(value: Any) -> int:
    try:
        return parse_window(value)
    except ValueError as exc:
        raise _fail("invalid_window", str(exc)) from None


def _amount(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise _fail("invalid_amount", f"amount must be a decimal number like \"5.00\", got {type(value).__name__}")
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise _fail("invalid_amount", f"amount {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount <= 0:
        raise _fail("invalid_amount", f"amount must be a finite number greater than 0, got {str(value)[:40]}")
    # As a price's range (catalog.fields): 1e999999999 would become a billion-digit atomic amount.
    if len(amount.as_tuple().digits) > 80 or not -40 <= amount.adjusted() <= 40:
        raise _fail("invalid_amount", f"amount {str(value)[:40]!r} is out of range (at most 40 digits either side of the point)")
    return amount


def _count(low: int, high: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail("invalid_value", f"expected an integer {low}..{high}, got {value!r}")
        return value

    return check


Window = Annotated[int, BeforeValidator(_window)]
Amount = Annotated[Decimal, BeforeValidator(_amount)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Budget(_Model):
    amount: Amount  # decimal token amount; converted exactly with each tool's token decimals
    window: Window  # seconds


class Budgets(_Model):
    per_payer: Budget | None = None
    per_payer_per_tool: Budget | None = None
    per_owner: Budget | None = None


class RateLimit(_Model):
    requests: Annotated[int, BeforeValidator(_count(1, 1_000_000))]
    window: Window = 1
    burst: Annotated[int, BeforeValidator(_count(1, 1_000_000))] | None = None

    @property
    def rate_per_second(self) -> float:
        return self.requests / self.window

    @property
    def capacity(self) -> int:
        return self.burst or self.requests


class RateLimits(_Model):
    per_payer: RateLimit | None = None
    per_tool: RateLimit | None = None
    per_client: RateLimit | None = None


class Breaker(_Model):
    failures: Annotated[int, BeforeValidator(_count(1, 10_000))] = 5
    window_seconds: Annotated[int, BeforeValidator(_count(1, 86_400))] = 30
    cooldown_seconds: Annotated[int, BeforeValidator(_count(1, 86_400))] = 10


def parse_budget(text: str) -> Budget:
    """``"5.00/1d"`` → Budget(amount=5.00, window=86400)."""
    amount, sep, window = text.partition("/")
    if not sep:
        raise ValueError(f"a budget is written AMOUNT/WINDOW, e.g. 5.00/1d; got {text!r}")
    return Budget.model_validate({"amount": amount.strip(), "window": window.strip()})


def parse_rate_limit(text: str) -> RateLimit:
    """``"10/1s"`` or ``"60/1m"`` (burst = requests); ``"10/1s:20"`` sets a burst of 20."""
    head, _, burst = text.partition(":")
    requests, sep, window = head.partition("/")
    if not sep or not requests.strip().isdigit() or (burst and not burst.strip().isdigit()):
        raise ValueError(f"a rate limit is written REQUESTS/WINDOW[:BURST], e.g. 10/1s; got {text!r}")
    data: dict[str, Any] = {"requests": int(requests), "window": window.strip()}
    if burst:
        data["burst"] = int(burst)
    return RateLimit.model_validate(data)
