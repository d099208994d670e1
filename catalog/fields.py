"""The catalog's field types: each an ``Annotated`` type whose validator refuses a bad value with a
stable code and a message an owner can act on (``invalid_address``, ``invalid_price``...).

Shared by the resolved models (``catalog.models``) and the file shapes (``catalog.documents``).
"""

from __future__ import annotations

import functools
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
    PlainValidator,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from catalog.registry import network_names, resolve_network
from catalog.templates import parse_template

__all__ = [
    "SHARED_SCHEMAS",
    "Address",
    "AssetRef",
    "BaseUrl",
    "CatalogVersion",
    "Decimals",
    "Dollars",
    "FrozenModel",
    "HttpMethod",
    "JsonSchema",
    "Method",
    "Network",
    "NetworkRef",
    "OwnerId",
    "Price",
    "PriceRef",
    "PublicPath",
    "RefundOn",
    "SettleMode",
    "Text",
    "TimeoutSeconds",
    "ToolName",
    "TransferMethod",
    "UpstreamName",
    "UpstreamPath",
    "UpstreamTimeout",
    "VersionText",
]

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
SettleMode = Literal["after", "upfront"]
# Which failed calls of an upfront tool are refunded: the upstream's or the owner's (5xx, 401/403 of the
# owner's credentials, 408, 429, unreachable, timed out, a drifted answer; gateway.pipeline.refunds), or also
# the caller's own (404, 422...): a refund costs gas, so any payer could make the gateway spend it for free.
RefundOn = Literal["upstream_fault", "any_failure"]


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
    # No token has more than 36 decimals nor a supply near 10**40: beyond, a price is a typo (or an
    # attack: 1e-999999999 would make every later f"{price:f}" a billion-digit string).
    if len(price.as_tuple().digits) > 80 or not -40 <= price.adjusted() <= 40:
        raise _fail("invalid_price", f"price {str(value)[:40]!r} is out of range (at most 40 digits either side of the point)")
    if price <= 0:
        raise _fail("invalid_price", f"price must be greater than 0, got {value}")
    return price


class Dollars(Decimal):
    """A price written in dollars (``"$0.01"``): the amount, marked so the loader can require a
    dollar stablecoin for it. Arithmetic on it gives plain ``Decimal``s."""

    __slots__ = ()


def _price_ref(value: Any) -> Decimal:
    """A token amount (``0.002``, ``"0.002"``) or a price in dollars (``"$0.01"``, ``Dollars``)."""
    if isinstance(value, str) and value.strip().startswith("$"):
        text = value.strip()[1:].strip()
        if not text or text[0] in "+-" or not re.fullmatch(r"[0-9]*\.?[0-9]*", text):
            raise _fail("invalid_price", f"price {value!r} is not a dollar amount like \"$0.01\"")
        return Dollars(_price(text))
    return _price(value)


_network = _pattern(r"eip155:[0-9]+", "invalid_network", "network")


def _network_ref(value: Any) -> str:
    """``eip155:<chain id>``, or a network name the registry knows (``base``, ``base-sepolia``)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", value.strip()):
        caip2 = resolve_network(value)
        if caip2 is None:
            raise _fail(
                "unknown_network",
                f"unknown network name {value!r}: write eip155:<chain id>, or one of {', '.join(network_names())}",
            )
        return caip2
    return _network(value)


def _asset_ref(value: Any) -> str:
    """A token address (checksummed as ``Address``) or a stablecoin's symbol (``USDC``), kept
    upper case; the loader resolves a symbol against the registry for the tool's network."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9.]{1,15}", value.strip()):
        return value.strip().upper()
    return _address(value)


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
    if any(char.isspace() or not char.isprintable() for char in value):  # CR/LF would split the request line
        raise _fail("invalid_url", f"base_url {value[:80]!r} must not contain spaces or control characters")
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
SHARED_SCHEMAS = "shared_schemas"


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
    shared = info.context.get(SHARED_SCHEMAS) if isinstance(info.context, dict) else None
    if isinstance(shared, dict):
        # repr, not the sorted canonical text: only a schema equal in types and key order is the same
        schema = shared.setdefault(repr(schema), schema)
    return schema


OwnerId = Annotated[str, BeforeValidator(_pattern(r"[a-z0-9][a-z0-9_-]{0,62}", "invalid_name", "owner"))]
UpstreamName = Annotated[str, BeforeValidator(_pattern(r"[a-z0-9_-]{1,64}", "invalid_name", "upstream name"))]
ToolName = Annotated[str, BeforeValidator(_pattern(r"[a-zA-Z0-9_-]{1,64}", "invalid_name", "tool name"))]
Network = Annotated[str, BeforeValidator(_network)]
NetworkRef = Annotated[str, BeforeValidator(_network_ref)]  # a name (base) becomes eip155:8453
AssetRef = Annotated[str, BeforeValidator(_asset_ref)]  # an address, or a symbol (USDC)
PriceRef = Annotated[Decimal, PlainValidator(_price_ref)]  # a token amount, or Dollars
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
# How x402 ``exact`` moves a token: ``eip3009`` (transferWithAuthorization, USDC's way) or
# ``permit2`` (a Permit2 witness transfer through the x402 exact proxy: any ERC-20).
TransferMethod = Literal["eip3009", "permit2"]
CatalogVersion = Annotated[int, BeforeValidator(_version)]


class FrozenModel(BaseModel):
    """Every catalog model: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)
