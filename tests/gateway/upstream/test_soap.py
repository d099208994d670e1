"""SOAP envelopes from JSON arguments, and XML answers to JSON (the convention in gateway.upstream.soap)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from lxml import etree

from catalog.bridge import SoapOperation
from gateway.devkit.samples.soap_warehouse import WSDL_PATH
from gateway.upstream.soap import (
    SOAP11_NS,
    SOAP12_NS,
    SoapArgumentError,
    SoapDefinitionError,
    SoapRequestBuilder,
    content_type,
    element_to_json,
    find_fault,
    find_result,
    parse_xml,
)

NS = "urn:acme:warehouse"


def inline(version: str = "1.1", **extra: object) -> SoapOperation:
    return SoapOperation(endpoint="/soap", version=version, namespace=NS, operation="PlaceOrder", **extra)


def body_of(envelope: bytes) -> etree._Element:
    root = etree.fromstring(envelope)
    [body] = [c for c in root if etree.QName(c).localname == "Body"]
    return body[0]


@pytest.mark.parametrize(("version", "env"), [("1.1", SOAP11_NS), ("1.2", SOAP12_NS)])
def test_inline_envelope_in_either_version(version: str, env: str) -> None:
    builder = SoapRequestBuilder(inline(version, arguments={"Sku": "sku", "Qty": "quantity"}), {})
    envelope = builder.build({"quantity": 3, "sku": "BLT-100", "ignored": "x"})
    root = etree.fromstring(envelope)
    assert etree.QName(root).namespace == env and etree.QName(root).localname == "Envelope"
    operation = body_of(envelope)
    assert operation.tag == f"{{{NS}}}PlaceOrder"
    assert [(c.tag, c.text) for c in operation] == [(f"{{{NS}}}Sku", "BLT-100"), (f"{{{NS}}}Qty", "3")]  # catalog order


def test_inline_envelope_writes_nested_lists_booleans_and_decimals_and_skips_absent_ones() -> None:
    schema = {"properties": {"lines": {}, "rush": {}, "price": {}, "note": {}, "missing": {}}}
    builder = SoapRequestBuilder(inline(qualified=False), schema)  # element order = input_schema order
    envelope = builder.build({
        "price": Decimal("0.10"), "rush": True, "note": None,
        "lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}],
    })
    operation = body_of(envelope)
    assert [c.tag for c in operation] == ["lines", "lines", "rush", "price"]
    assert [[(g.tag, g.text) for g in c] for c in operation[:2]] == [[("sku", "A"), ("qty", "1")], [("sku", "B"), ("qty", "2")]]
    assert operation[2].text == "true" and operation[3].text == "0.10"


def test_content_type_and_action_headers() -> None:
    assert content_type("1.1", "urn:a/Op") == {"content-type": "text/xml; charset=utf-8", "soapaction": '"urn:a/Op"'}
    assert content_type("1.2", "urn:a/Op") == {"content-type": 'application/soap+xml; charset=utf-8; action="urn:a/Op"'}


@pytest.mark.parametrize(("version", "env"), [("1.1", SOAP11_NS), ("1.2", SOAP12_NS)])
def test_wsdl_envelope_through_zeep_matches_arguments_ignoring_case(version: str, env: str) -> None:
    operation = SoapOperation(endpoint="/soap/warehouse", version=version, operation="SearchItems", wsdl=str(WSDL_PATH))
    builder = SoapRequestBuilder(operation, {})
    assert builder.action == "urn:acme:warehouse/SearchItems"  # taken from the WSDL binding
    envelope = builder.build({"query": "bolt", "max_results": 3})
    assert etree.QName(etree.fromstring(envelope)).namespace == env
    assert [(etree.QName(c).localname, c.text) for c in body_of(envelope)] == [("Query", "bolt"), ("MaxResults", "3")]
    with pytest.raises(SoapArgumentError):
        builder.build({"query": "bolt", "colour": "red"})  # not a parameter of the operation


def test_wsdl_problems_are_definition_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SoapDefinitionError, match="does not exist"):
        SoapRequestBuilder(SoapOperation(endpoint="/s", operation="X", wsdl=str(tmp_path / "none.wsdl")), {})
    with pytest.raises(SoapDefinitionError, match="no SOAP 1.1 port with operation 'Nope'"):
        SoapRequestBuilder(SoapOperation(endpoint="/s", operation="Nope", wsdl=str(WSDL_PATH)), {})


ANSWER = f"""<s:Envelope xmlns:s="{SOAP11_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><s:Body>
<r:GetStockLevelResponse xmlns:r="{NS}"><r:Payload><r:StockLevel sku="BLT-100" unit="pcs">
  <r:Available>true</r:Available>
  <r:Bins><r:Bin>A1</r:Bin><r:Bin>B7</r:Bin></r:Bins>
  <r:Reserved>3</r:Reserved><r:Quantity>42</r:Quantity>
  <r:Weight unit="kg">1.50</r:Weight><r:Note xsi:nil="true"/><r:Tag>x</r:Tag><r:Tag>y</r:Tag>
</r:StockLevel></r:Payload></r:GetStockLevelResponse></s:Body></s:Envelope>""".encode()


def test_xml_to_json_without_a_schema_keeps_strings_local_names_attributes_and_repeats() -> None:
    root = parse_xml(ANSWER)
    assert root is not None and find_fault(root) is None
    result = find_result(root, "StockLevel")
    assert result is not None
    assert element_to_json(result, None) == {
        "@sku": "BLT-100", "@unit": "pcs", "Available": "true", "Bins": {"Bin": ["A1", "B7"]},
        "Reserved": "3", "Quantity": "42", "Weight": {"@unit": "kg", "#text": "1.50"}, "Note": None, "Tag": ["x", "y"],
    }


def test_xml_to_json_follows_the_output_schema() -> None:
    schema = {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer"}, "reserved": {"type": "number"},
        "available": {"type": "boolean"}, "bins": {"type": "array", "items": {"type": "string"}},
        "weight": {"type": "object", "properties": {"unit": {"type": "string"}, "value": {"type": "number"}}},
        "tag": {"type": "array", "items": {"type": "string"}}, "note": {"type": ["string", "null"]},
    }}
    result = find_result(parse_xml(ANSWER), "StockLevel")  # type: ignore[arg-type]
    assert result is not None
    assert element_to_json(result, schema) == {
        "sku": "BLT-100", "@unit": "pcs", "available": True, "bins": ["A1", "B7"], "reserved": 3, "quantity": 42,
        "weight": {"unit": "kg", "value": 1.5}, "note": None, "tag": ["x", "y"],
    }


def test_one_element_is_still_an_array_when_the_schema_says_so() -> None:
    xml = f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><R><Item sku="A"><Name>n</Name><InStock>0</InStock></Item></R></s:Body></s:Envelope>'
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "name": {"type": "string"}, "in_stock": {"type": "boolean"}}}}}}
    result = find_result(parse_xml(xml.encode()), None)  # type: ignore[arg-type]
    assert result is not None
    assert element_to_json(result, schema) == {"items": [{"sku": "A", "name": "n", "in_stock": False}]}


def test_soap_11_fault() -> None:
    xml = (f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><s:Fault><faultcode>s:Server</faultcode>'
           "<faultstring>backend down</faultstring><detail><Retry>later</Retry></detail></s:Fault></s:Body></s:Envelope>")
    fault = find_fault(parse_xml(xml.encode()))  # type: ignore[arg-type]
    assert fault is not None
    assert (fault.code, fault.message, fault.detail, fault.retryable) == ("Server", "backend down", {"Retry": "later"}, True)


def test_soap_12_fault() -> None:
    xml = (f'<e:Envelope xmlns:e="{SOAP12_NS}"><e:Body><e:Fault><e:Code><e:Value>e:Sender</e:Value></e:Code>'
           '<e:Reason><e:Text xml:lang="en">bad sku</e:Text></e:Reason></e:Fault></e:Body></e:Envelope>')
    fault = find_fault(parse_xml(xml.encode()))  # type: ignore[arg-type]
    assert fault is not None
    assert (fault.code, fault.message, fault.retryable) == ("Sender", "bad sku", False)


def test_hostile_xml_is_not_expanded() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><x>&b;</x>'
    root = parse_xml(bomb)
    assert root is None or "aaaaaaaaaa" not in "".join(root.itertext())
    assert parse_xml(b"not xml") is None


def test_numbers_json_cannot_hold_or_that_take_long_to_build_stay_as_the_upstream_wrote_them() -> None:
    """``1e600000`` is 8 bytes; as an int it takes a minute holding the GIL (every request of the
    process stops). Past Python's 4,300 digits an int is no JSON number, nor is ``inf``: each is
    kept as its text, and what can be a number still is."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}}
    for text, kind in (("1e600000", "n"), ("1e5000", "n"), ("-1E4001", "n"), ("1e999", "x"), ("-1e400", "x")):
        result = etree.fromstring(f"<r><{kind}>{text}</{kind}></r>")
        assert element_to_json(result, schema) == {kind: text}, text
    result = etree.fromstring("<r><n>1e3999</n><x>2.5e300</x></r>")
    assert element_to_json(result, schema) == {"n": 10**3999, "x": 2.5e300}


def test_a_decimal_argument_is_written_in_plain_digits_unless_that_takes_thousands_of_them() -> None:
    from gateway.upstream.soap import _text

    assert _text(Decimal("1.50")) == "1.50" and _text(Decimal("2E+3")) == "2000"
    assert _text(Decimal("1E+999999999")) == "1E+999999999"  # not a gigabyte of zeros
