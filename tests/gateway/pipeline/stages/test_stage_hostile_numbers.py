"""Numbers a caller writes to hurt the gateway, read from the path, the query or a JSON body: each is a
clear 4xx (or passes on as the text it is), never a 500, and never a whole number built digit by digit
on the event loop. Against a running gateway: tests/e2e/test_attacks_hostile_numbers.py."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.errors import GatewayError
from gateway.pipeline.compiled import SchemaValidator
from gateway.pipeline.stages.arguments import collect_arguments, validate_arguments
from tests.gateway.upstream.test_forwarding import entry, tools

SCHEMA = "{type: object, properties: {n: {type: integer}, x: {type: number, multipleOf: 0.01}}}"
QUERY_TOOL = (f"  - name: t\n    description: d\n    method: GET\n    path: /o\n    price: \"0.001\"\n"
              f"    upstream_path: /rec/o\n    input_schema: {SCHEMA}\n")


def tool() -> object:
    return tools("http://127.0.0.1:1", QUERY_TOOL)["t"]


@pytest.mark.parametrize("value", ["\u00b2", "--5", "1" * 5000, "\u0663"])
def test_an_integer_that_is_not_ascii_digits_stays_text_for_the_schema_to_refuse(value: str) -> None:
    arguments = collect_arguments(tool(), {}, [("n", value)], b"", "GET")  # type: ignore[arg-type]
    assert arguments == {"n": value}
    with pytest.raises(GatewayError) as refused:
        validate_arguments(SchemaValidator({"type": "object", "properties": {"n": {"type": "integer"}}}), arguments)
    assert (refused.value.code, refused.value.status) == ("invalid_arguments", 422)


def test_a_number_with_a_huge_exponent_stays_text_and_is_refused_not_a_500() -> None:
    """Ten million digits wherever it is written out in full (a SOAP envelope): never a number here."""
    arguments = collect_arguments(tool(), {}, [("x", "1e9999999")], b"", "GET")  # type: ignore[arg-type]
    assert arguments["x"] == "1e9999999"
    assert isinstance(collect_arguments(tool(), {}, [("x", "1.5e999")], b"", "GET")["x"], Decimal)  # type: ignore[arg-type]
    schema = {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.01}}}
    with pytest.raises(GatewayError) as refused:
        validate_arguments(SchemaValidator(schema), arguments)
    assert refused.value.code == "invalid_arguments"


@pytest.mark.parametrize("number", [b"1" * 5000, b"1e999999999", b"-2.5E+1001", b"1e-1001"])
def test_a_json_number_past_the_digits_any_api_takes_is_invalid_json_not_a_500(number: bytes) -> None:
    body_tool = tools("http://127.0.0.1:1", entry("t", "POST", "/o", "/rec/o"))["t"]
    with pytest.raises(GatewayError) as refused:
        collect_arguments(body_tool, {}, [], b'{"quantity": ' + number + b"}", "POST")
    assert (refused.value.code, refused.value.status) == ("invalid_json_body", 400)
    assert collect_arguments(body_tool, {}, [], b'{"quantity": 2.5e1000}', "POST") == {"quantity": Decimal("2.5e1000")}


@pytest.mark.parametrize(("value", "fine"), [
    ("1.5", True), ("20", True), ("1.505", False), ("0.07", True), ("1e9999999", False), ("-3.10", True),
])
def test_a_fractional_multiple_of_is_exact_on_the_decimals_arguments_are_read_as(value: str, fine: bool) -> None:
    """A catalog's ``multipleOf: 0.01`` is a float and a query's 1.5 a Decimal: jsonschema's own check
    divided one by the other (TypeError, a 500 on every such call)."""
    arguments = collect_arguments(tool(), {}, [("x", value)], b"", "GET")  # type: ignore[arg-type]
    validator = SchemaValidator({"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.01}}})
    if fine:
        validate_arguments(validator, arguments)
    else:
        with pytest.raises(GatewayError):
            validate_arguments(validator, arguments)
    for number in (1.5, 3, 0.07):  # as MCP hands arguments over: floats and ints
        validate_arguments(validator, {"x": number})
