"""The file shapes: exactly what an owner writes, every key optional where the file may omit it.

The loader validates a file against ``CatalogDoc`` and then resolves it into ``catalog.models``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag

from catalog.answers import Answers
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
    AssetRef,
    BaseUrl,
    CatalogVersion,
    Decimals,
    FrozenModel,
    JsonSchema,
    Method,
    NetworkRef,
    OwnerId,
    Price,
    PriceRef,
    PublicPath,
    RefundOn,
    SettleMode,
    Text,
    TimeoutSeconds,
    ToolName,
    TransferMethod,
    UpstreamName,
    UpstreamPath,
    UpstreamTimeout,
    VersionText,
)
from catalog.limits import Breaker, Budgets, RateLimits
from catalog.price_rules import PriceRuleDoc, PriceTierDoc
from catalog.reaccess import Reaccess
from catalog.usage import UsageRule
from catalog.user_auth import TokenExchange, UserAuth, WalletAccounts

__all__ = ["KNOWN_KEYS", "CatalogDoc", "CatalogPaymentDoc", "OfferDoc", "PaymentDoc", "ToolDoc", "UpstreamDoc"]


class PaymentDoc(FrozenModel):
    """A tool's own ``payment:`` block: any subset of the catalog's terms. ``network`` may be a
    name (``base``) and ``asset`` a stablecoin's symbol (``USDC``); the loader resolves both
    against ``catalog.registry`` (``catalog.terms``)."""

    network: NetworkRef | None = None
    asset: AssetRef | None = None
    asset_name: Text | None = None
    asset_version: VersionText | None = None
    decimals: Decimals | None = None
    pay_to: Address | None = None
    max_timeout_seconds: TimeoutSeconds | None = None
    usd_pegged: bool | None = None  # a dollar stablecoin; the registry says so for the ones it knows
    scheme: str | None = None  # the x402 scheme (``upto``: needs a max_price; catalog.upto)
    # ``permit2``: an ERC-20 without EIP-3009, paid in ``exact`` through Permit2 (no asset_version
    # needed: such a token may have no EIP-712 domain); default ``eip3009``
    asset_transfer_method: TransferMethod | None = None


class CatalogPaymentDoc(PaymentDoc):
    """The catalog's ``payment:`` block, the defaults of every tool. ``asset_name``,
    ``asset_version`` and ``decimals`` may be left out when the registry knows the asset."""

    network: NetworkRef
    asset: AssetRef
    pay_to: Address
    max_timeout_seconds: TimeoutSeconds = 120
    scheme: str = "exact"


class OfferDoc(PaymentDoc):
    """One further offer (``catalog.offers``): a payment block that names its asset, with an
    optional price and scheme; the rest defaults to the tool's terms."""

    asset: AssetRef
    scheme: str | None = None
    price: PriceRef | None = None


class UpstreamDoc(FrozenModel):
    base_url: BaseUrl
    timeout_seconds: UpstreamTimeout = 10.0
    breaker: Breaker = Breaker()
    failover: tuple[BaseUrl, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    auth: Auth | None = None


def _price_kind(value: Any) -> str:
    return "[rule]" if isinstance(value, dict) or isinstance(value, PriceRuleDoc) else "[amount]"


# A tool's price: one amount, or a rule over its arguments (``catalog.price_rules``). The tags are
# left out of diagnostics' paths (``Source.add_validation_errors``).
PriceSpec = Annotated[
    Annotated[PriceRef, Tag("[amount]")] | Annotated[PriceRuleDoc, Tag("[rule]")], Discriminator(_price_kind)
]


class ToolDoc(FrozenModel):
    name: ToolName
    description: Text
    method: Method
    path: PublicPath
    upstream: UpstreamName | None = None
    upstream_path: UpstreamPath | None = None
    price: PriceSpec  # a token amount, dollars ("$0.01", for a dollar stablecoin), or a rule
    settle: SettleMode | None = None
    refund_on: RefundOn | None = None  # None: upstream_fault (catalog.fields.RefundOn); upfront tools only
    side_effects: bool = False
    payment: PaymentDoc | None = None
    offers: tuple[OfferDoc, ...] | None = None  # None: the catalog's offers; (): none beside payment
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
    answers: Answers | None = None  # trimming to a caller's budget, schema drift (catalog.answers)
    user_auth: UserAuth | None = None  # the end user's OAuth token, checked before the offer (catalog.user_auth)
    wallet_accounts: WalletAccounts | None = None  # payer address -> upstream user credential, after verify
    reaccess: Reaccess | None = None  # a payer gets a paid answer again, free, by signing in (catalog.reaccess)
    usage: UsageRule | None = None  # an upto tool charged by what it used (catalog.usage)
    stream: bool = False  # the upstream's answer is relayed as it arrives (SSE or chunked)

    @property
    def amount(self) -> Decimal:
        """The price as one amount: a rule's price of a count of 1 once the loader resolved it."""
        assert isinstance(self.price, Decimal), "a price rule is resolved first (loader._priced)"
        return self.price


class CatalogDoc(FrozenModel):
    catalog: CatalogVersion
    owner: OwnerId
    description: str | None = None
    payment: CatalogPaymentDoc
    offers: tuple[OfferDoc, ...] = ()  # further offers of every tool that has no offers of its own
    upstreams: Annotated[dict[UpstreamName, UpstreamDoc], Field(min_length=1)]
    tools: Annotated[list[ToolDoc], Field(min_length=1)]
    max_price: Price | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()


KNOWN_KEYS: frozenset[str] = frozenset().union(
    *(m.model_fields for m in (CatalogPaymentDoc, OfferDoc, UpstreamDoc, ToolDoc, CatalogDoc, Budgets, RateLimits, Breaker, Answers,
                                      UserAuth, TokenExchange, WalletAccounts, PriceRuleDoc, PriceTierDoc, UsageRule))
) | {"from"}
