"""The file shapes: exactly what an owner writes, every key optional where the file may omit it.

The loader validates a file against ``CatalogDoc`` and then resolves it into ``catalog.models``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from catalog.bridge import (
    Auth,
    BridgeKind,
    FailureRule,
    RestRequest,
    RetryPolicy,
    SoapOperation,
)
from catalog.fields import (
    Address,
    BaseUrl,
    CatalogVersion,
    Decimals,
    FrozenModel,
    JsonSchema,
    Method,
    Network,
    OwnerId,
    Price,
    PublicPath,
    SettleMode,
    Text,
    TimeoutSeconds,
    ToolName,
    UpstreamName,
    UpstreamPath,
    UpstreamTimeout,
    VersionText,
)
from catalog.limits import Breaker, Budgets, RateLimits
from catalog.models import PaymentTerms

__all__ = ["KNOWN_KEYS", "CatalogDoc", "PaymentDoc", "ToolDoc", "UpstreamDoc"]

class PaymentDoc(FrozenModel):
    """A tool's own ``payment:`` block: any subset of the catalog's terms."""

    network: Network | None = None
    asset: Address | None = None
    asset_name: Text | None = None
    asset_version: VersionText | None = None
    decimals: Decimals | None = None
    pay_to: Address | None = None
    max_timeout_seconds: TimeoutSeconds | None = None


class UpstreamDoc(FrozenModel):
    base_url: BaseUrl
    timeout_seconds: UpstreamTimeout = 10.0
    breaker: Breaker = Breaker()
    failover: tuple[BaseUrl, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    auth: Auth | None = None


class ToolDoc(FrozenModel):
    name: ToolName
    description: Text
    method: Method
    path: PublicPath
    upstream: UpstreamName | None = None
    upstream_path: UpstreamPath | None = None
    price: Price
    settle: SettleMode | None = None
    side_effects: bool = False
    payment: PaymentDoc | None = None
    input_schema: JsonSchema = Field(default_factory=lambda: {"type": "object"})
    output_schema: JsonSchema | None = None
    max_price: Price | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()
    kind: BridgeKind = "rest"
    request: RestRequest | None = None
    soap: SoapOperation | None = None
    retry: bool | None = None
    failure_when: tuple[FailureRule, ...] = ()


class CatalogDoc(FrozenModel):
    catalog: CatalogVersion
    owner: OwnerId
    description: str | None = None
    payment: PaymentTerms
    upstreams: Annotated[dict[UpstreamName, UpstreamDoc], Field(min_length=1)]
    tools: Annotated[list[ToolDoc], Field(min_length=1)]
    max_price: Price | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()


KNOWN_KEYS: frozenset[str] = frozenset().union(
    *(m.model_fields for m in (PaymentDoc, UpstreamDoc, ToolDoc, CatalogDoc, Budgets, RateLimits, Breaker))
)
