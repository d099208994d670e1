"""The gateway-wide limits, read from the settings (``X402GW_BUDGET_*``, ``X402GW_RATE_LIMIT_*``,
``X402GW_MAX_PRICE``, ``X402GW_MAX_HEADER_BYTES``); the catalog adds its own per owner and per tool
(``catalog.limits``), and ``gateway.safety.checks.Safety`` applies both."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from catalog.limits import Budgets, RateLimits
from gateway.settings import Settings

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Gateway-wide limits (from settings); the catalog adds its own per owner and per tool."""

    budgets: Budgets = field(default_factory=Budgets)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    max_price: Decimal | None = None
    max_header_bytes: int = 32_768

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        safety = settings.safety
        return cls(
            budgets=Budgets(
                per_payer=safety.budget_per_payer,
                per_payer_per_tool=safety.budget_per_payer_per_tool,
                per_owner=safety.budget_per_owner,
            ),
            rate_limits=RateLimits(
                per_payer=safety.rate_limit_per_payer,
                per_tool=safety.rate_limit_per_tool,
                per_client=safety.rate_limit_per_client,
            ),
            max_price=safety.max_price,
            max_header_bytes=settings.http.max_header_bytes,
        )
