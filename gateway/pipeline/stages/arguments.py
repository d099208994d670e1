"""Stages ``body`` and ``arguments``: read the request body, then the tool's arguments, validated.

Arguments are the path parameters, the query string (coerced to the schema's scalar types) and a
JSON object body, merged and validated against the tool's input schema *before* any price is
quoted: a call that can never succeed gets 422, not a 402. Stops with 413, 400 or 422.

Only these validated arguments reach the upstream (the bridge re-serialises them), so nothing the
validator did not see may hide in the request: a JSON key given twice anywhere in the body is 400
``duplicate_json_key`` (a first-key-wins upstream would read another value than the one checked),
a body on a method without one (GET, HEAD, DELETE) is 400 ``body_not_allowed``, and an argument the
catalog maps to an upstream header may not hold control characters (422 ``invalid_arguments``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator
from starlette.requests import Request
from starlette.responses import Response

from catalog import Tool
from gateway import codes
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.upstream.trimming import answer_request

if TYPE_CHECKING:
    from gateway.pipeline.compiled import CompiledTool

__all__ = ["Arguments", "Body", "collect_arguments", "validate_arguments"]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_KEY_SHOWN = 100  # characters of a duplicate key quoted back in the refusal
# Characters no HTTP header value may carry (CR and LF would split it; the rest are refused by
# HTTP clients): an argument mapped to an upstream header holding one is refused before any 402.
_HEADER_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# Characters XML 1.0 cannot carry: a SOAP tool's string argument holding one is refused likewise.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
# A lone UTF-16 surrogate (from a \ud800 escape) is no character: it cannot be re-encoded for the
# upstream. Only a body with such an escape, or that is not plain UTF-8, can hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")
BODY_SECONDS = 30.0  # for a request's whole body to arrive (slowloris: one stalled client, one task, for ever)
_MAX_DIGITS = 1000  # of a whole number read from the path or query (int() refuses over 4,300); a decimal's exponent
_INTEGER = re.compile(rf"-?[0-9]{{1,{_MAX_DIGITS}}}")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of the body's parser: every object, nested ones too, without repeats."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise GatewayError(
                "duplicate_json_key",
                f"the JSON body gives key {key[:_KEY_SHOWN]!r} more than once; send each key once",
                key=key[:_KEY_SHOWN],
            )
        document[key] = value
    return document


def _no_constant(name: str) -> Any:
    raise GatewayError("invalid_json_body", f"the request body is not valid JSON ({name} is not a JSON number)")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included; without recursion (any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _may_hold_surrogates(body: bytes) -> bool:
    if _ESCAPED_SURROGATE.search(body):
        return True
    if body.isascii():
        return False
    try:
        body.decode("utf-8")  # strict: refuses encoded surrogates
    except UnicodeDecodeError:
        return True  # UTF-16/32, or UTF-8 with encoded surrogates: look
    return False


def _check_characters(tool: Tool, arguments: dict[str, Any]) -> None:
    """Arguments bound for an upstream header (REST) or an XML document (SOAP) may hold only what
    those can carry: refused here, before any offer, rather than failing in the bridge."""
    mapping = tool.request
    bound: list[tuple[str, re.Pattern[str], str]] = []
    if mapping is not None and mapping.headers:
        bound = [(argument, _HEADER_FORBIDDEN, f"goes into the upstream header {header}, which cannot hold control characters")
                 for header, argument in mapping.headers.items()]
    if tool.kind == "soap":
        bound = [(name, _XML_FORBIDDEN, "goes into a SOAP request, which cannot hold control characters")
                 for name in arguments]
    fields = [
        {"field": argument, "problem": problem}
        for argument, forbidden, problem in bound
        if any(forbidden.search(text) for text in _strings(arguments.get(argument)))
    ]
    if fields:
        raise GatewayError(
            "invalid_arguments",
            "an argument holds control characters (CR, LF, NUL...) that its upstream request cannot carry",
            fields=fields,
        )


def _bounded(text: str) -> Decimal:
    """A JSON number with a fraction or an exponent, exact, within ``_MAX_DIGITS`` of the point either
    way: ``1e999999999`` is 11 bytes and 10^9 digits wherever it is written out (a SOAP envelope)."""
    number = Decimal(text)
    if abs(number.adjusted()) > _MAX_DIGITS:
        raise ValueError("a number past the digits any API takes")
    return number


def _coerce(value: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" in kinds and _INTEGER.fullmatch(value):  # ASCII digits: "²".isdigit(), int() refuses it
        return int(value)
    if "number" in kinds:
        try:
            number = Decimal(value)
        except InvalidOperation:
            return value
        if number.is_finite() and abs(number.adjusted()) <= _MAX_DIGITS:  # else: the string, which "number" refuses
            # 1e9999999 is integral: int() of it would build ten million digits on the event loop
            whole = "." not in value and number.adjusted() <= _MAX_DIGITS and number == number.to_integral_value()
            return int(number) if whole else number
    if "boolean" in kinds and value in ("true", "false"):
        return value == "true"
    return value


def collect_arguments(
    tool: Tool, params: dict[str, str], query: list[tuple[str, str]], body: bytes, method: str
) -> dict[str, Any]:
    properties: dict[str, Any] = (tool.input_schema or {}).get("properties", {}) or {}
    arguments: dict[str, Any] = {}
    for name, value in params.items():
        arguments[name] = _coerce(value, properties.get(name, {}))
    for name, value in query:
        schema = properties.get(name, {})
        coerced = _coerce(value, schema.get("items", {}) if schema.get("type") == "array" else schema)
        if schema.get("type") == "array":
            arguments.setdefault(name, []).append(coerced)
        elif name in arguments:
            raise GatewayError("invalid_arguments", f"argument {name!r} is given twice", fields=[{"field": name}])
        else:
            arguments[name] = coerced
    if method not in BODY_METHODS:
        if body:
            raise GatewayError(
                "body_not_allowed", f"a {method} call carries no body; send the arguments in the path and query"
            )
    elif body.strip():
        try:
            data = json.loads(body, parse_float=_bounded, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # JSONDecodeError, undecodable UTF-8, an integer of 4,300+ digits, 1e999999999
            raise GatewayError("invalid_json_body", "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise GatewayError("invalid_json_body", "the request body must be a JSON object")
        if _may_hold_surrogates(body) and any(_SURROGATE.search(text) for text in _strings(data)):
            raise GatewayError("invalid_json_body", "the request body is not valid JSON (a string holds an unpaired surrogate)")
        for name, value in data.items():
            if name in arguments:
                raise GatewayError("invalid_arguments", f"argument {name!r} is given twice", fields=[{"field": name}])
            arguments[name] = value
    _check_characters(tool, arguments)
    return arguments


def validate_arguments(validator: Draft202012Validator, arguments: dict[str, Any]) -> None:
    # ``validator`` is the tool's ``SchemaValidator`` (gateway.pipeline.compiled): its exact ``multipleOf``
    # answers 1E+9999999 as "not a multiple", never decimal's DivisionImpossible.
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    fields = [
        {"field": "/".join(str(p) for p in error.absolute_path) or "(arguments)", "problem": error.message[:300]}
        for error in errors[:20]
    ]
    raise GatewayError(
        "invalid_arguments",
        "the arguments do not match the tool's input schema; fix the listed fields and call again",
        fields=fields,
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise GatewayError("request_too_large", f"request bodies are limited to {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_SECONDS):  # a client that stalls mid-body holds nothing for ever
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise GatewayError("request_too_large", f"request bodies are limited to {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(codes.REQUEST_BODY_TIMEOUT, f"the request body did not all arrive within {BODY_SECONDS:g} s",
                           status=408, retryable=True) from None
    return b"".join(chunks)


class Body:
    """Reads the body, refusing one over the limit (413) before any of it is parsed."""

    name = "body"
    shape_only = True  # the fast path takes only requests without a body

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def __call__(self, ctx: RequestContext) -> Response | None:
        assert ctx.request is not None
        ctx.body = await read_body(ctx.request, self.max_body_bytes)
        return None


class Arguments:
    """Path parameters, query and body merged into the tool's arguments, checked against its schema."""

    name = "arguments"
    shape_only = True

    async def __call__(self, ctx: RequestContext) -> Response | None:
        tool, compiled, request = ctx.tool, ctx.compiled, ctx.request
        assert tool is not None and compiled is not None and request is not None
        # The gateway's own x402gw_* parameters (trimming of the answer) are read here, before any
        # 402, and are not arguments: a malformed one is a 400 that costs nothing.
        ctx.answer_request, query = answer_request(tool, request.query_params.multi_items(), ctx.query)
        ctx.arguments = collect_arguments(tool, ctx.params, query, ctx.body, ctx.method)
        check_arguments(compiled, ctx.arguments)
        return None


MAX_VALID_ARGUMENTS = 1024  # per tool: the latest distinct argument sets that passed its schema
_MAX_KEY_CHARS = 1024  # larger arguments are validated every time, never kept


def check_arguments(compiled: CompiledTool, arguments: dict[str, Any]) -> None:
    """``validate_arguments`` against the tool's schema, remembering what passed: a paid call
    repeats the arguments its 402 was validated with, and agents repeat calls. The key is the
    arguments' canonical JSON, which tells apart every value JSON Schema does (``1`` and ``1.0``
    and ``true``, a string and a number); refusals are never kept (their errors are rebuilt)."""
    try:
        key: str | None = json.dumps(arguments, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        key = None
    if key is not None and len(key) > _MAX_KEY_CHARS:
        key = None
    valid = compiled.valid_arguments
    if key is not None and key in valid:
        return
    validate_arguments(compiled.validator, arguments)
    if key is not None:
        if len(valid) >= MAX_VALID_ARGUMENTS:
            del valid[next(iter(valid))]  # the oldest
        valid[key] = None
