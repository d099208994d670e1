"""Typed catalog models.

Two layers: the private ``_*Doc`` models mirror the YAML file exactly (every key optional where
the file may omit it), and the public ``Catalog`` / ``Tool`` / ``PaymentTerms`` / ``Upstream``
are the *resolved* view the gateway uses: every tool carries its effective payment terms, its
upstream object and its exact price. All are frozen, and unknown keys are errors.
"""

from __future__ import annotations

import functools
import math
import json

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from eth_utils import to_checksum_address
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from catalog.bridge import Auth, BridgeKind, FailureRule, RestRequest, RetryPolicy, SoapOperation
from catalog.limits import Breaker, Budgets, RateLimits
from catalog.pricing import to_atomic
from catalog.routing import parse_template

__all__ = ["Catalog", "Catalogs", "HttpMethod", "PaymentTerms", "SettleMode", "Tool", "Upstream"]

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
SettleMode = Literal["after", "upfront"]

# Methods that change state on the upstream: their tools settle before the upstream call
# (``upfront``) unless the catalog says ``settle: after``, so no side effect runs unpaid.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a settle-after payment's window must cover beyond the upstream's worst-case time: verify,
# the ledger's write-ahead and the facilitator's own margin (it refuses to broadcast an
# authorization within 6 s of its ``validBefore``).
SETTLE_MARGIN_SECONDS = 15


def default_settle(method: str, side_effects: bool) -> SettleMode:
    """``upfront`` for state-changing methods and tools marked as having side effects."""
    return "upfront" if side_effects or method in STATE_CHANGING_METHODS else "after"


def _fail(code: str, message: str) -> PydanticCustomError:
    # The message goes through context so braces in paths like /a/{x} are not format fields.
    return PydanticCustomError(code, "{detail}", {"detail": message})


def _pattern(regex: str, code: str, what: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(code, f"{what} must be a string, got {_kind(value)}")
        if not compiled.fullmatch(value):
            raise _fail(code, f"{what} {value!r} must match {regex}")
        return value

    return check


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", Decimal: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


@functools.lru_cache(maxsize=1024)
def _checksum(address: str) -> str:
    # A catalog names a handful of addresses many times (payTo, asset on every tool).
    return str(to_checksum_address(address))


def _address(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
        raise _fail("invalid_address", f"{value!r} is not an address (0x followed by 40 hex digits)")
    checksummed = _checksum(value)
    body = value[2:]
    if body != body.lower() and body != body.upper() and value != checksummed:
        raise _fail("invalid_address", f"{value} has a wrong EIP-55 checksum (expected {checksummed})")
    if int(body, 16) == 0:
        raise _fail("zero_address", "the zero address cannot be used")
    return checksummed


def _price(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise _fail("invalid_price", f"price must be a decimal number like \"0.002\", got {_kind(value)}")
    try:
        price = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise _fail("invalid_price", f"price {value!r} is not a decimal number") from None
    if not price.is_finite():
        raise _fail("invalid_price", f"price must be a finite number, got {value}")
    if price <= 0:
        raise _fail("invalid_price", f"price must be greater than 0, got {value}")
    return price


def _strict_int(low: int, high: int, code: str = "invalid_value") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(code, f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise _fail(code, f"{value} is out of range {low}..{high}")
        return value

    return check


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, float)):
        raise _fail("invalid_value", f"timeout must be a number of seconds, got {_kind(value)}")
    if not 0 < value <= 300:
        raise _fail("invalid_value", f"timeout {value} must be > 0 and <= 300 seconds")
    return float(value)


def _base_url(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("invalid_url", f"base_url must be a string, got {_kind(value)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _fail("invalid_url", f"base_url {value!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail("invalid_url", f"base_url {value!r} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise _fail("invalid_url", "base_url must not contain credentials; configure them on the gateway")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise _fail("invalid_url", f"base_url {value!r} must not have a query or fragment")
    return value.rstrip("/")


def _path(allow_trailing_slash: bool) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _fail("invalid_path", f"path must be a string, got {_kind(value)}")
        try:
            parse_template(value, allow_trailing_slash=allow_trailing_slash)
        except ValueError as exc:
            raise _fail("invalid_path", str(exc)) from None
        return value

    return check


def _method(value: Any) -> str:
    method = value.upper() if isinstance(value, str) else value
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        hint = " (HEAD is served automatically for GET routes)" if method == "HEAD" else ""
        raise _fail("invalid_method", f"method must be GET, POST, PUT, PATCH or DELETE, got {value!r}{hint}")
    return method


def _version(value: Any) -> int:
    if isinstance(value, bool) or value != 1:
        raise _fail("unsupported_version", f"catalog schema version must be 1, got {value!r}")
    return 1


def _without_decimals(value: Any) -> Any:
    # YAML numbers with a dot load as Decimal (for exact prices); JSON Schemas must stay
    # JSON-serialisable for /tools and /openapi.json, and a schema is not money.
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and value.is_finite() else float(value)
    if isinstance(value, dict):
        return {k: _without_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_decimals(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _schema_problem(canonical: str) -> str | None:
    """Meta-validation is ~4 ms a schema; catalogs repeat schemas, so each distinct one is checked once."""
    try:
        Draft202012Validator.check_schema(json.loads(canonical))
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
    return None


# Key of the validation context under which a load keeps one object per distinct schema: thousands
# of tools often share a few schemas, and each copy would be a handful of objects to keep and scan.
_SHARED_SCHEMAS = "shared_schemas"


def _json_schema(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> dict[str, Any]:
    """Decimals made JSON numbers, then ``dict[str, Any]``, then checked against the meta-schema."""
    canonical: str | None = None
    if isinstance(value, dict):
        try:
            # Most schemas are plain JSON already: they are kept as they are, and this text (which
            # the validated copy, holding the same keys and values, would give too) is the cache key.
            canonical = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            value = _without_decimals(value)
    else:
        value = _without_decimals(value)
    schema: dict[str, Any] = handler(value)
    if canonical is None:
        try:
            canonical = json.dumps(schema, sort_keys=True, default=str)
        except (TypeError, ValueError):
            canonical = None
    problem = _schema_problem(canonical) if canonical is not None else None
    if canonical is None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            problem = f"not a valid JSON Schema: {exc.message}"
    if problem is not None:
        raise _fail("invalid_json_schema", problem) from None
    shared = info.context.get(_SHARED_SCHEMAS) if isinstance(info.context, dict) else None
    if isinstance(shared, dict):
        # repr, not the sorted canonical text: only a schema equal in types and key order is the same
        schema = shared.setdefault(repr(schema), schema)
    return schema


OwnerId = Annotated[str, BeforeValidator(_pattern(r"[a-z0-9][a-z0-9_-]{0,62}", "invalid_name", "owner"))]
UpstreamName = Annotated[str, BeforeValidator(_pattern(r"[a-z0-9_-]{1,64}", "invalid_name", "upstream name"))]
ToolName = Annotated[str, BeforeValidator(_pattern(r"[a-zA-Z0-9_-]{1,64}", "invalid_name", "tool name"))]
Network = Annotated[str, BeforeValidator(_pattern(r"eip155:[0-9]+", "invalid_network", "network"))]
Address = Annotated[str, BeforeValidator(_address)]
Price = Annotated[Decimal, BeforeValidator(_price)]
Decimals = Annotated[int, BeforeValidator(_strict_int(0, 36))]
TimeoutSeconds = Annotated[int, BeforeValidator(_strict_int(1, 3600))]
UpstreamTimeout = Annotated[float, BeforeValidator(_timeout)]
BaseUrl = Annotated[str, BeforeValidator(_base_url)]
PublicPath = Annotated[str, BeforeValidator(_path(allow_trailing_slash=False))]
UpstreamPath = Annotated[str, BeforeValidator(_path(allow_trailing_slash=True))]
Method = Annotated[HttpMethod, BeforeValidator(_method)]
JsonSchema = Annotated[dict[str, Any], WrapValidator(_json_schema)]
Text = Annotated[str, Field(min_length=1, max_length=4096)]
# asset_version: "2" is easy to write unquoted; an integer is accepted and kept as text.
VersionText = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) is int else v), Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


# -- resolved models: what the gateway uses ---------------------------------------------------


class PaymentTerms(_Model):
    network: Network  # CAIP-2, eip155:<chain id>
    asset: Address  # token contract, EIP-55 checksummed
    asset_name: Text  # EIP-712 domain name of the token
    asset_version: VersionText  # EIP-712 domain version
    decimals: Decimals
    pay_to: Address
    max_timeout_seconds: TimeoutSeconds = 120


class Upstream(_Model):
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


def _consistency_problems(
    *, path: str, upstream_path: str, price: Decimal, decimals: int, input_schema: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """Cross-field checks of one tool, as ``(field, code, message)``; shared by loader and Tool."""
    problems: list[tuple[str, str, str]] = []
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


def max_call_seconds(upstream: Upstream) -> float:
    """The longest one call to ``upstream`` can take: every try (retries and failover) at its
    timeout, and the longest wait between tries (backoff or an honoured Retry-After)."""
    policy = upstream.retry
    tries = max(policy.attempts, 1 + len(upstream.failover))
    waits = (tries - 1) * max(policy.max_backoff_seconds, policy.max_retry_after_seconds)
    return tries * upstream.timeout_seconds + waits


class Tool(_Model):
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
    side_effects: bool = False
    payment: PaymentTerms  # effective terms: catalog defaults merged with the tool's own block
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
        problems = _consistency_problems(
            path=tool.path, upstream_path=tool.upstream_path, price=tool.price,
            decimals=tool.payment.decimals, input_schema=tool.input_schema,
        )
        if problems:
            raise ValueError("; ".join(f"{field}: {message}" for field, _, message in problems))
        return tool

    @property
    def price_atomic(self) -> int:
        return to_atomic(self.price, self.payment.decimals)

    @property
    def max_call_seconds(self) -> float:
        """The longest one upstream call of this tool can take with every retry and failover."""
        return max_call_seconds(self.upstream)

    @property
    def payment_window_seconds(self) -> int:
        """The least time a payment's ``validBefore`` must leave: for ``settle: after`` tools, the
        upstream's worst case plus the settle margin (so it cannot expire while the upstream runs);
        for ``upfront`` tools, the settle margin."""
        upstream = self.max_call_seconds if self.settle == "after" else 0.0
        return math.ceil(upstream) + SETTLE_MARGIN_SECONDS

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(s.value for s in parse_template(self.path) if s.is_param)


class Catalog(_Model):
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


class Catalogs(_Model):
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


# -- file shapes: exactly what an owner writes -----------------------------------------------


class _PaymentDoc(_Model):
    """A tool's own ``payment:`` block: any subset of the catalog's terms."""

    network: Network | None = None
    asset: Address | None = None
    asset_name: Text | None = None
    asset_version: VersionText | None = None
    decimals: Decimals | None = None
    pay_to: Address | None = None
    max_timeout_seconds: TimeoutSeconds | None = None


class _UpstreamDoc(_Model):
    base_url: BaseUrl
    timeout_seconds: UpstreamTimeout = 10.0
    breaker: Breaker = Breaker()
    failover: tuple[BaseUrl, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    auth: Auth | None = None


class _ToolDoc(_Model):
    name: ToolName
    description: Text
    method: Method
    path: PublicPath
    upstream: UpstreamName | None = None
    upstream_path: UpstreamPath | None = None
    price: Price
    settle: SettleMode | None = None
    side_effects: bool = False
    payment: _PaymentDoc | None = None
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


class _CatalogDoc(_Model):
    catalog: Annotated[int, BeforeValidator(_version)]
    owner: OwnerId
    description: str | None = None
    payment: PaymentTerms
    upstreams: Annotated[dict[UpstreamName, _UpstreamDoc], Field(min_length=1)]
    tools: Annotated[list[_ToolDoc], Field(min_length=1)]
    max_price: Price | None = None
    budgets: Budgets = Budgets()
    rate_limits: RateLimits = RateLimits()


KNOWN_KEYS: frozenset[str] = frozenset().union(
    *(m.model_fields for m in (_PaymentDoc, _UpstreamDoc, _ToolDoc, _CatalogDoc, Budgets, RateLimits, Breaker))
)
