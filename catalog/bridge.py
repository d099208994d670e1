"""Protocol-bridge settings an owner writes in a catalog: how a tool's arguments reach its upstream,
with which credentials, retries and failover, and when an answer counts as a failure.

Upstream level (applies to every tool on that upstream)::

    upstreams:
      warehouse:
        base_url: "http://127.0.0.1:9102"
        failover: ["http://10.0.0.7:9102"]      # tried in turn when the one before is down
        timeout_seconds: 5
        retry: {attempts: 3, backoff_seconds: 0.2, max_backoff_seconds: 2,
                max_retry_after_seconds: 5, on_status: [429, 500, 502, 503, 504]}
        auth: {type: header, name: X-Warehouse-Token, value_env: WAREHOUSE_TOKEN}
        # or {type: basic, username: svc, password_file: /run/secrets/pw}
        # or {type: bearer, token_env: ACME_TOKEN}

Tool level::

    kind: soap                 # rest (default) or soap
    retry: true                # retry although the call is not idempotent (default: GET/PUT/DELETE only)
    request:                   # rest: arguments → upstream request (default: path params from the
      query: {q: city}         #   path, query and JSON body passed through as they came)
      headers: {X-Units: units}
      body: {/order/symbol: symbol, qty: quantity}   # a key starting with / is a JSON pointer
    soap:
      endpoint: /soap/warehouse
      version: "1.1"           # or "1.2"
      action: "urn:acme:warehouse/GetStockLevel"
      namespace: "urn:acme:warehouse"
      operation: GetStockLevel # the request element (inline) or the WSDL operation
      arguments: {Sku: sku, Warehouse: warehouse}  # inline: child element ← argument, in this order
                                    # (or a list of names; default: input_schema's properties in order)
      wsdl: /srv/warehouse.wsdl     # instead of namespace/arguments: the envelope is built by zeep;
                                    # arguments match the WSDL's parameters ignoring case and "_"
      result: StockLevel       # first element of this local name in the Body becomes the answer
    failure_when:              # an answer that matches is a failure whatever its status: not charged
      - {pointer: /ok, equals: false, message_pointer: /reason}
      - {xpath: "//*[local-name()='Error']", code: item_discontinued}

Secrets are only *named* here (environment variable or file); the gateway reads them at start-up
and refuses to start when one is missing. This module does no I/O.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "Auth", "BasicAuth", "BearerAuth", "BridgeKind", "FailureRule", "HeaderAuth", "RestRequest", "RetryPolicy",
    "SoapOperation", "bridge_problems", "secret_references",
]

BridgeKind = Literal["rest", "soap"]

_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
_POINTER = re.compile(r"(/([^/~]|~[01])*)*")
# Headers the gateway owns: a mapping must not smuggle them in.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "authorization", "cookie",
    "payment-signature", "x-payment", "x-request-id", "soapaction", "content-type",
})


def _fail(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{detail}", {"detail": message})


def _matching(regex: re.Pattern[str], code: str, what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise _fail(code, f"{what} {value!r} must match {regex.pattern}")
        return value

    return BeforeValidator(check)


def _seconds(low: float, high: float) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and type(value).__name__ != "Decimal":
            raise _fail("invalid_value", f"expected a number of seconds, got {type(value).__name__}")
        if not low <= value <= high:
            raise _fail("invalid_value", f"{value} is out of range {low}..{high} seconds")
        return float(value)

    return BeforeValidator(check)


def _header_name(value: Any) -> str:
    if not isinstance(value, str) or not _HEADER.fullmatch(value):
        raise _fail("invalid_header", f"{value!r} is not an HTTP header name")
    if value.lower() in _RESERVED_HEADERS:
        raise _fail("reserved_header", f"header {value!r} is set by the gateway and cannot be mapped")
    return value


EnvName = Annotated[str, _matching(_ENV, "invalid_env_name", "environment variable name")]
SecretFile = Annotated[str, Field(min_length=1, max_length=4096)]
HeaderName = Annotated[str, BeforeValidator(_header_name)]
XmlName = Annotated[str, _matching(_XML_NAME, "invalid_xml_name", "XML element name")]
JsonPointer = Annotated[str, _matching(_POINTER, "invalid_pointer", "JSON pointer")]
ArgumentName = Annotated[str, Field(min_length=1, max_length=128)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


def _one_source(model: BaseModel, what: str, env: str, file: str) -> None:
    given = [name for name in (env, file) if getattr(model, name) is not None]
    if len(given) != 1:
        raise _fail("secret_source", f"{what}: give exactly one of {env} or {file} (never the secret itself)")


class HeaderAuth(_Model):
    """A custom header, e.g. ``X-Api-Key: <value of $ACME_KEY>``."""

    type: Literal["header"]
    name: HeaderName
    value_env: EnvName | None = None
    value_file: SecretFile | None = None
    prefix: str = ""

    @model_validator(mode="after")
    def _source(self) -> HeaderAuth:
        _one_source(self, "header auth", "value_env", "value_file")
        return self


class BearerAuth(_Model):
    type: Literal["bearer"]
    token_env: EnvName | None = None
    token_file: SecretFile | None = None

    @model_validator(mode="after")
    def _source(self) -> BearerAuth:
        _one_source(self, "bearer auth", "token_env", "token_file")
        return self


class BasicAuth(_Model):
    type: Literal["basic"]
    username: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # a user name is not a secret
    username_env: EnvName | None = None
    username_file: SecretFile | None = None
    password_env: EnvName | None = None
    password_file: SecretFile | None = None

    @model_validator(mode="after")
    def _source(self) -> BasicAuth:
        if sum(v is not None for v in (self.username, self.username_env, self.username_file)) != 1:
            raise _fail("secret_source", "basic auth: give exactly one of username, username_env or username_file")
        _one_source(self, "basic auth", "password_env", "password_file")
        return self


Auth = Annotated[HeaderAuth | BearerAuth | BasicAuth, Field(discriminator="type")]


def secret_references(auth: HeaderAuth | BearerAuth | BasicAuth | None) -> list[tuple[str, str]]:
    """``("env" | "file", name)`` of every secret an auth block names, in a stable order."""
    if auth is None:
        return []
    names = [(kind, getattr(auth, field)) for field in type(auth).model_fields
             for kind in ("env", "file") if field.endswith("_" + kind) and getattr(auth, field) is not None]
    return names


class RetryPolicy(_Model):
    """Retries of one upstream. ``attempts`` counts every try, so 1 (the default) never retries."""

    attempts: Annotated[int, Field(ge=1, le=10)] = 1
    backoff_seconds: Annotated[float, _seconds(0, 60)] = 0.2
    max_backoff_seconds: Annotated[float, _seconds(0, 300)] = 5.0
    # A longer Retry-After is not waited for: the agent gets the answer (retryable) at once.
    max_retry_after_seconds: Annotated[float, _seconds(0, 300)] = 10.0
    on_status: tuple[Annotated[int, Field(ge=400, le=599)], ...] = (429, 502, 503, 504)


class RestRequest(_Model):
    """Where a REST tool's arguments go: ``upstream name: argument name``."""

    query: dict[Annotated[str, Field(min_length=1, max_length=128)], ArgumentName] | None = None
    headers: dict[HeaderName, ArgumentName] | None = None
    body: dict[Annotated[str, Field(min_length=1, max_length=512)], ArgumentName] | None = None

    @model_validator(mode="after")
    def _pointers(self) -> RestRequest:
        for key in self.body or {}:
            if key.startswith("/") and not _POINTER.fullmatch(key):
                raise _fail("invalid_pointer", f"body key {key!r} is not a JSON pointer")
        return self

    def arguments(self) -> list[tuple[str, str]]:
        return [(where, arg) for where in ("query", "headers", "body") for arg in (getattr(self, where) or {}).values()]


class SoapOperation(_Model):
    endpoint: Annotated[str, Field(pattern=r"^/[^?#{}\s]*$", max_length=1024)]
    version: Literal["1.1", "1.2"] = "1.1"
    action: Annotated[str, Field(max_length=1024)] | None = None
    namespace: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    operation: XmlName
    # inline: child elements in order; a list of argument names, or {element name: argument name}
    arguments: tuple[ArgumentName, ...] | dict[XmlName, ArgumentName] | None = None
    qualified: bool = True  # child elements in the operation's namespace (elementFormDefault)
    wsdl: SecretFile | None = None  # a file path; a relative one is taken from the catalog file's directory
    service: XmlName | None = None
    port: XmlName | None = None
    result: XmlName | None = None

    @model_validator(mode="before")
    @classmethod
    def _version_text(cls, data: Any) -> Any:
        # `version: 1.1` unquoted loads as a number; it is still the version the owner meant.
        if isinstance(data, dict) and data.get("version") is not None and not isinstance(data["version"], str):
            return {**data, "version": str(data["version"])}
        return data

    def anchored(self, catalog_file: str) -> SoapOperation:
        """The same operation with a relative ``wsdl`` taken from the catalog file's directory."""
        if self.wsdl is None or PurePath(self.wsdl).is_absolute() or catalog_file.startswith("<"):
            return self
        return self.model_copy(update={"wsdl": str(PurePath(catalog_file).parent / self.wsdl)})

    @model_validator(mode="after")
    def _source(self) -> SoapOperation:
        if self.wsdl is None and self.namespace is None:
            raise _fail("soap_definition", "an inline SOAP operation needs a namespace (or give a wsdl file)")
        if self.wsdl is not None and self.arguments is not None:
            raise _fail("soap_definition", "arguments are taken from the WSDL; remove 'arguments' or 'wsdl'")
        return self


class FailureRule(_Model):
    """An answer matching this rule is a failure, whatever its HTTP status: it is not charged."""

    pointer: JsonPointer | None = None  # into the JSON answer (for SOAP: the converted result)
    xpath: Annotated[str, Field(min_length=1, max_length=1024)] | None = None  # into the XML answer
    equals: Any = None  # without it the rule matches when the pointer exists / the xpath is true
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = "upstream_rejected"
    message: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    message_pointer: JsonPointer | None = None
    status: Annotated[int, Field(ge=400, le=599)] = 502
    retryable: bool = False

    @model_validator(mode="before")
    @classmethod
    def _has_equals(cls, data: Any) -> Any:
        # `equals: null` is a real comparison, so "given" is tracked apart from the value.
        if isinstance(data, dict):
            return {**data, "has_equals": "equals" in data}
        return data

    has_equals: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> FailureRule:
        if (self.pointer is None) == (self.xpath is None):
            raise _fail("failure_rule", "a failure rule needs exactly one of pointer or xpath")
        return self


def bridge_problems(
    *, kind: BridgeKind, method: str, input_schema: dict[str, Any],
    request: RestRequest | None, soap: SoapOperation | None,
) -> list[tuple[str, str, str]]:
    """Cross-field checks of one tool's bridge settings, as ``(field, code, message)``."""
    problems: list[tuple[str, str, str]] = []
    properties = input_schema.get("properties")
    known = set(properties) if isinstance(properties, dict) else None
    if kind == "soap":
        if soap is None:
            problems.append(("soap", "soap_required", "a tool of kind soap needs a 'soap' block"))
        if request is not None:
            problems.append(("request", "request_not_for_soap", "'request' maps REST calls; a SOAP tool uses 'soap'"))
        if soap is not None and soap.arguments is not None and known is not None:
            names = soap.arguments.values() if isinstance(soap.arguments, dict) else soap.arguments
            for name in names:
                if name not in known:
                    problems.append(("soap.arguments", "unknown_argument",
                                     f"argument {name!r} is not in input_schema.properties"))
    else:
        if soap is not None:
            problems.append(("soap", "soap_not_for_rest", "'soap' is for tools of kind soap; add kind: soap"))
        if request is not None:
            for where, name in request.arguments():
                if known is not None and name not in known:
                    problems.append((f"request.{where}", "unknown_argument",
                                     f"argument {name!r} is not in input_schema.properties"))
            if request.body is not None and method not in ("POST", "PUT", "PATCH", "DELETE"):
                problems.append(("request.body", "body_not_allowed", f"a {method} request has no body"))
    return problems
