"""The resolved catalog: the view the gateway uses.

Every tool carries its effective payment terms, its upstream object and its exact price. All
models are frozen, and unknown keys are errors. What an owner writes is ``catalog.documents``;
the field types and their checks are ``catalog.fields``.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal
from typing import Any

from pydantic import Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

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
    BaseUrl,
    Decimals,
    FrozenModel,
    HttpMethod,
    Method,
    Network,
    OwnerId,
    Price,
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
from catalog.price_rules import PriceRule
from catalog.pricing import to_atomic
from catalog.reaccess import Reaccess
from catalog.templates import parse_template
from catalog.usage import UsageRule
from catalog.user_auth import UserAuth, WalletAccounts

__all__ = [
    "SETTLE_MARGIN_SECONDS",
    "Catalog",
    "Catalogs",
    "HttpMethod",
    "PaymentOffer",
    "PaymentTerms",
    "SettleMode",
    "Tool",
    "Upstream",
    "consistency_problems",
    "default_settle",
    "max_call_seconds",
    "payment_window_seconds",
]


# Methods that change state on the upstream: their tools settle before the upstream call
# (``upfront``) unless the catalog says ``settle: after``, so no side effect runs unpaid.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a payment's window must cover beyond the upstream's worst-case time (all of it, for an
# ``upfront`` tool): verify, the ledger's write-ahead and the block that takes the settlement (at
# least one block interval after the broadcast, 12 s on Ethereum, plus propagation), or the token
# refuses it past ``validBefore`` and the gateway pays the revert's gas. A chain with slower blocks
# needs a larger margin.
SETTLE_MARGIN_SECONDS = 15


def default_settle(method: str, side_effects: bool) -> SettleMode:
    """``upfront`` for state-changing methods and tools marked as having side effects."""
    return "upfront" if side_effects or method in STATE_CHANGING_METHODS else "after"



class PaymentTerms(FrozenModel):
    network: Network  # CAIP-2, eip155:<chain id>
    asset: Address  # token contract, EIP-55 checksummed
    asset_name: Text  # EIP-712 domain name of the token
    # EIP-712 domain version; None only for a token paid through Permit2 that has no domain
    asset_version: VersionText | None = None
    decimals: Decimals
    pay_to: Address
    max_timeout_seconds: TimeoutSeconds = 120
    # How ``exact`` moves the token: EIP-3009 (the token's own signed transfer), or Permit2 for an
    # ERC-20 without EIP-3009 (the offer's extra.assetTransferMethod: permit2; catalog.documents).
    asset_transfer_method: TransferMethod = "eip3009"
    # The x402 scheme the offer is made in; checked against the gateway's registered schemes
    # (settlement.schemes.Schemes) at start-up, since the catalog knows no scheme.
    scheme: str = "exact"
    # ``upto`` only: the most one call may charge, which the payer signs for (the tool's max_price,
    # else the catalog's; catalog.upto). The price is what is charged, at most this.
    maximum: Price | None = None
    # A dollar stablecoin (USDC, USDT, DAI...): one unit is one US dollar. Budgets count such
    # assets together in dollars; others per asset. A price without a token may only be shared by
    # offers of such assets (``catalog.offers``).
    usd_pegged: bool = False

    @model_validator(mode="after")
    def _version_for_eip3009(self) -> PaymentTerms:
        if self.asset_version is None and self.asset_transfer_method == "eip3009":
            raise ValueError("asset_version is required for an EIP-3009 token (its EIP-712 domain version)")
        return self


class PaymentOffer(FrozenModel):
    """One way to pay for a tool: terms (network, asset, scheme, payee...) and the price in that asset."""

    terms: PaymentTerms
    price: Price  # decimal amount of ``terms.asset``

    @property
    def price_atomic(self) -> int:
        return to_atomic(self.price, self.terms.decimals)


class Upstream(FrozenModel):
    name: UpstreamName
    base_url: BaseUrl  # no trailing slash
    timeout_seconds: UpstreamTimeout = 10.0
    breaker: Breaker = Breaker()
    # protocol bridge (catalog.bridge): alternate base URLs, retries, credentials named not written
    failover: tuple[BaseUrl, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    auth: Auth | None = None


@functools.lru_cache(maxsize=4096)
def _exact_in(price: Decimal, decimals: int) -> bool:
    """Whether ``price`` is a whole number of atomic units; a catalog has few distinct prices.
    (Equal Decimals such as 0.002 and 0.0020 share an entry: they have the same answer.)"""
    try:
        to_atomic(price, decimals)
    except ValueError:
        return False
    return True


# The gateway's own routes (gateway.app and its surfaces): a tool there would be listed for sale and
# never reached. Whole first segments, and exact paths.
RESERVED_PREFIXES = frozenset({"admin", "mcp", ".well-known", "discovery", "receipts", "facilitator"})
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/tools", "/openapi.json", "/llms.txt"})


def consistency_problems(
    *, path: str, upstream_path: str, price: Decimal, decimals: int, input_schema: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """Cross-field checks of one tool, as ``(field, code, message)``; shared by loader and Tool."""
    problems: list[tuple[str, str, str]] = []
    first = path.strip("/").split("/", 1)[0]
    if path.rstrip("/") in RESERVED_PATHS or first in RESERVED_PREFIXES:
        problems.append(("path", "reserved_path", f"path {path!r} is the gateway's own (its operations, discovery, MCP, "
                                                  f"receipts or admin routes answer it): choose another"))
    if not _exact_in(price, decimals):
        problems.append(("price", "price_precision", f"price {price:f} has more digits than the token's {decimals} decimals"))
    params = [s.value for s in parse_template(path) if s.is_param]
    upstream_params = [s.value for s in parse_template(upstream_path, allow_trailing_slash=True) if s.is_param]
    if sorted(params) != sorted(upstream_params):
        problems.append((
            "upstream_path", "path_param_mismatch",
            f"upstream_path {upstream_path!r} must use exactly the parameters of path {path!r} "
            f"({', '.join(params) or 'none'})",
        ))
    properties = input_schema.get("properties")
    if isinstance(properties, dict):
        missing = [p for p in params if p not in properties]
        if missing:
            problems.append((
                "input_schema", "path_param_not_in_schema",
                f"path parameter(s) {', '.join(missing)} of {path!r} missing from input_schema.properties",
            ))
    return problems


def payment_window_seconds(upstream: Upstream, settle: SettleMode) -> int:
    """The least time a payment's ``validBefore`` must leave: for ``settle: after`` tools, the
    upstream's worst case plus the settle margin (so it cannot expire while the upstream runs);
    for ``upfront`` tools, the settle margin (verify, the write-ahead, the block after the broadcast)."""
    return (math.ceil(max_call_seconds(upstream)) if settle == "after" else 0) + SETTLE_MARGIN_SECONDS


def max_call_seconds(upstream: Upstream) -> float:
    """The longest one call to ``upstream`` can take: every try (retries and failover) at its
    timeout, and the longest wait between tries (backoff or an honoured Retry-After)."""
    policy = upstream.retry
    tries = max(policy.attempts, 1 + len(upstream.failover))
    waits = (tries - 1) * max(policy.max_backoff_seconds, policy.max_retry_after_seconds)
    return tries * upstream.timeout_seconds + waits


class Tool(FrozenModel):
    owner: OwnerId
    name: ToolName
    description: Text
    method: Method
    path: PublicPath  # public path on the gateway, e.g. /quotes/{symbol}
    upstream: Upstream
    upstream_path: UpstreamPath
    price: Price  # decimal token amount
    # None (not written): ``default_settle(method, side_effects)``; see STATE_CHANGING_METHODS
    settle: SettleMode = "after"
    refund_on: RefundOn = "upstream_fault"  # an upfront tool's failed calls refunded (catalog.fields.RefundOn)
    side_effects: bool = False
    payment: PaymentTerms  # effective terms: catalog defaults merged with the tool's own block
    # Further ways to pay, beside ``payment`` at ``price`` (which stays the first offer): the
    # catalog's or the tool's ``offers`` (``catalog.offers``). Empty for a single-offer tool.
    alternatives: tuple[PaymentOffer, ...] = ()
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    output_schema: dict[str, Any] | None = None
    # safety limits of this tool alone (catalog-wide ones live on its Catalog; see catalog.limits)
    max_price: Decimal | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()
    # protocol bridge (catalog.bridge): how arguments reach the upstream, what counts as a failure
    kind: BridgeKind = "rest"
    request: RestRequest | None = None
    soap: SoapOperation | None = None
    retry: bool | None = None  # None: retried only when the upstream method is idempotent
    failure_when: tuple[FailureRule, ...] = ()
    # what answers may be made into: trimmed to a caller's budget, checked for drift (catalog.answers)
    answers: Answers | None = None
    # a dynamic price (catalog.price_rules): ``price`` is then the rule's price of a count of 1, and
    # each request's offers carry the rule's price of its arguments (gateway.pipeline.compiled)
    price_rule: PriceRule | None = None
    # the end user's OAuth 2.0 token, checked before the offer and sent upstream (catalog.user_auth)
    user_auth: UserAuth | None = None
    # or: the verified payer's own upstream credential, from the owner's secret file (catalog.user_auth)
    wallet_accounts: WalletAccounts | None = None
    # a payer who paid within the window gets the answer again by signing in (catalog.reaccess)
    reaccess: Reaccess | None = None
    # an ``upto`` tool charged by what each call used, read from its answer (catalog.usage)
    usage: UsageRule | None = None
    # the upstream's answer is relayed as it arrives, not buffered (SSE or chunked)
    stream: bool = False

    @model_validator(mode="wrap")
    @classmethod
    def _consistent(cls, value: Any, handler: ModelWrapValidatorHandler[Tool]) -> Tool:
        # A Tool passed in (as in ``Catalog(tools=...)``) was checked when it was made; an "after"
        # validator would check every tool of a catalog again.
        if isinstance(value, Tool):
            return value
        if isinstance(value, dict) and value.get("settle") is None and isinstance(value.get("method"), str):
            value = {**value, "settle": default_settle(value["method"].upper(), bool(value.get("side_effects")))}
        tool = handler(value)
        problems = consistency_problems(
            path=tool.path, upstream_path=tool.upstream_path, price=tool.price,
            decimals=tool.payment.decimals, input_schema=tool.input_schema,
        )
        problems += [
            (f"alternatives[{i}].price", "price_precision",
             f"price {offer.price:f} has more digits than the token's {offer.terms.decimals} decimals")
            for i, offer in enumerate(tool.alternatives) if not _exact_in(offer.price, offer.terms.decimals)
        ]
        if problems:
            raise ValueError("; ".join(f"{field}: {message}" for field, _, message in problems))
        return tool

    @property
    def offers(self) -> tuple[PaymentOffer, ...]:
        """Every way to pay for this tool, the catalog's ``payment`` at ``price`` first."""
        return (PaymentOffer.model_construct(terms=self.payment, price=self.price), *self.alternatives)

    def paid_with(self, offer: PaymentOffer) -> Tool:
        """This tool as paid with ``offer``: its terms and price in place of the first offer's, so
        what follows the payer's choice (ledger row, budgets, decimals) reads the chosen terms."""
        if offer.terms is self.payment and offer.price == self.price:
            return self
        return self.model_copy(update={"payment": offer.terms, "price": offer.price})

    @property
    def price_atomic(self) -> int:
        return to_atomic(self.price, self.payment.decimals)

    @property
    def max_call_seconds(self) -> float:
        """The longest one upstream call of this tool can take with every retry and failover."""
        return max_call_seconds(self.upstream)

    @property
    def payment_window_seconds(self) -> int:
        """The least time a payment's ``validBefore`` must leave (``payment_window_seconds``)."""
        return payment_window_seconds(self.upstream, self.settle)

    @property
    def settles_streamed(self) -> bool:
        """A ``stream: true`` tool charged by what it delivered (a usage rule, settled after): its
        settlement comes once the stream has ended (gateway.pipeline.stages.relay)."""
        return self.stream and self.usage is not None and self.settle != "upfront"

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(s.value for s in parse_template(self.path) if s.is_param)


class Catalog(FrozenModel):
    source: str  # file (or name) the catalog was read from
    owner: OwnerId
    description: str | None = None
    payment: PaymentTerms  # the catalog-wide defaults
    upstreams: dict[str, Upstream]
    tools: tuple[Tool, ...]
    max_price: Decimal | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()

    def tool(self, name: str) -> Tool:
        for tool in self.tools:
            if tool.name == name:
                return tool
        raise KeyError(name)


class Catalogs(FrozenModel):
    """Several owners' catalogs served by one gateway; tool names and routes are unique across all."""

    catalogs: tuple[Catalog, ...]
    _tools: tuple[Tool, ...] = PrivateAttr(default=())
    _by_name: dict[str, Tool] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._tools = tuple(tool for catalog in self.catalogs for tool in catalog.tools)
        self._by_name = {tool.name: tool for tool in self._tools}

    @property
    def tools(self) -> tuple[Tool, ...]:
        return self._tools

    def tool(self, name: str) -> Tool:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name
