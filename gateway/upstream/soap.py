"""SOAP 1.1 / 1.2 for the bridge: JSON arguments → envelope, XML answer → JSON, faults → values.

Envelopes come from the tool's inline definition (operation element in its namespace, one child
element per argument) or, when the catalog names a WSDL, from zeep. Answers are *not* parsed by
the WSDL: legacy services rarely match their own, so the answer is converted by this convention,
guided by the tool's output_schema where it has one:

- element and attribute names lose their namespace (local names only);
- an attribute becomes ``"@name"``, or ``"name"`` when the schema has that property;
- an element with only text is a scalar; with text *and* attributes or children, the text is ``"#text"``;
- keys take the schema's spelling when they match it ignoring case, ``_`` and ``-``
  (``<Quantity>`` → ``"quantity"``, ``<InStock>`` → ``"in_stock"``),
  an array property named as the plural collects repeated elements (``<Item>``… → ``"items"``), and
  the text of an element with attributes goes to ``"value"`` when the schema has that property;
- repeated sibling elements are an array; a schema array is always an array, and a single wrapper
  element whose children repeat one name (``<Bins><Bin/><Bin/></Bins>``) is unwrapped into it;
- scalars are converted by the schema's type (integer, number, boolean); without a schema they stay
  strings; ``xsi:nil="true"`` and empty non-string scalars are null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lxml import etree

from catalog.bridge import SoapOperation
from gateway.codes import INVALID_ARGUMENTS
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import CONTENT_TYPE, SOAP_ACTION, lower

__all__ = [
    "SOAP11_NS", "SOAP12_NS", "SoapArgumentError", "SoapDefinitionError", "SoapFault", "SoapRequestBuilder", "content_type",
    "element_to_json", "find_fault", "find_result", "parse_xml",
]

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
_ENVELOPE_NS = {"1.1": SOAP11_NS, "1.2": SOAP12_NS}

# No entities, no network, no huge trees: the answer comes from a server we do not control.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=True)


class SoapArgumentError(GatewayError, ValueError):
    """The arguments cannot be written as this operation's request (still a ValueError, as before)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_ARGUMENTS, message)


class SoapDefinitionError(GatewayConfigError):
    """A SOAP operation cannot be prepared (bad WSDL, unknown operation): the gateway does not start."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "soap_definition_invalid")


@dataclass(frozen=True, slots=True)
class SoapFault:
    code: str  # local part of faultcode / Code/Value, e.g. "Server", "Client", "Receiver"
    message: str
    detail: Any

    @property
    def retryable(self) -> bool:
        return self.code.split(".")[0] in ("Server", "Receiver")


def local(tag: Any) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def content_type(version: str, action: str | None) -> dict[str, str]:
    if version == "1.2":
        value = "application/soap+xml; charset=utf-8"
        return {lower(CONTENT_TYPE): value + (f'; action="{action}"' if action else "")}
    return {lower(CONTENT_TYPE): "text/xml; charset=utf-8", lower(SOAP_ACTION): f'"{action or ""}"'}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):  # plain digits, unless that would be thousands of them (then 1E+9999)
        return format(value, "f") if abs(value.adjusted()) <= _MAX_DIGITS else str(value)
    return str(value)


def _append(parent: etree._Element, tag: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            _append(parent, tag, item)
        return
    child = etree.SubElement(parent, tag)
    if isinstance(value, dict):
        for name, item in value.items():
            sub = etree.QName(etree.QName(tag).namespace, name).text if etree.QName(tag).namespace else name
            _append(child, sub, item)
    else:
        child.text = _text(value)


class SoapRequestBuilder:
    """Builds the envelope of one operation; compiled once per tool at start-up."""

    def __init__(self, operation: SoapOperation, input_schema: dict[str, Any]) -> None:
        self.operation = operation
        self.version = operation.version
        self.action = operation.action
        self._zeep: tuple[Any, Any] | None = None
        properties = input_schema.get("properties")
        names = tuple(properties) if isinstance(properties, dict) else ()
        arguments = operation.arguments if operation.arguments is not None else names
        # element name → argument name, in element order
        self.elements: dict[str, str] = dict(arguments) if isinstance(arguments, dict) else {a: a for a in arguments}
        self._wsdl_names: dict[str, str] = {}  # folded argument name → the WSDL's parameter name
        if operation.wsdl is not None:
            self._load_wsdl(operation)

    def _load_wsdl(self, operation: SoapOperation) -> None:
        import zeep  # imported here: only catalogs that name a WSDL pay for it
        import zeep.exceptions
        from zeep.wsdl.bindings.soap import Soap11Binding, Soap12Binding

        path = Path(operation.wsdl or "")
        if not path.is_file():
            raise SoapDefinitionError(f"WSDL file {str(path)!r} does not exist")
        try:
            client = zeep.Client(str(path))  # type: ignore[no-untyped-call]
        except (zeep.exceptions.Error, etree.LxmlError, OSError, ValueError, TypeError) as exc:
            raise SoapDefinitionError(f"WSDL file {str(path)!r} cannot be read: {type(exc).__name__}") from None
        wanted = Soap12Binding if operation.version == "1.2" else Soap11Binding
        for service in client.wsdl.services.values():
            if operation.service and service.name != operation.service:
                continue
            for port in service.ports.values():
                if operation.port and port.name != operation.port:
                    continue
                if not isinstance(port.binding, wanted) or operation.operation not in port.binding._operations:
                    continue
                proxy = client.bind(service.name, port.name)
                body = port.binding._operations[operation.operation].input.body
                if body is not None and hasattr(body.type, "elements"):
                    self._wsdl_names = {_fold(name): name for name, _ in body.type.elements}
                if self.action is None:
                    self.action = port.binding._operations[operation.operation].soapaction
                self._zeep = (client, proxy)
                return
        raise SoapDefinitionError(
            f"WSDL {str(path)!r} has no SOAP {operation.version} port with operation {operation.operation!r}"
        )

    def build(self, arguments: dict[str, Any]) -> bytes:
        if self._zeep is not None:
            import zeep.exceptions

            client, proxy = self._zeep
            named = {self._wsdl_names.get(_fold(k), k): v for k, v in arguments.items() if v is not None}
            try:
                node = client.create_message(proxy, self.operation.operation, **named)
            except (zeep.exceptions.Error, TypeError, ValueError) as exc:
                raise SoapArgumentError(f"the arguments do not fit the WSDL operation ({type(exc).__name__})") from None
            return bytes(etree.tostring(node, xml_declaration=True, encoding="utf-8"))
        env = _ENVELOPE_NS[self.version]
        ns = self.operation.namespace or ""
        envelope = etree.Element(etree.QName(env, "Envelope"), nsmap={"soap": env, "m": ns})
        etree.SubElement(envelope, etree.QName(env, "Header"))
        body = etree.SubElement(envelope, etree.QName(env, "Body"))
        request = etree.SubElement(body, etree.QName(ns, self.operation.operation))
        for element, argument in self.elements.items():
            if argument in arguments:
                tag = etree.QName(ns, element).text if self.operation.qualified else element
                try:
                    _append(request, tag, arguments[argument])
                except ValueError:  # lxml: text XML cannot carry (control characters, surrogates)
                    raise SoapArgumentError(f"argument {argument!r} holds characters XML cannot carry") from None
        return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def parse_xml(data: bytes) -> etree._Element | None:
    try:
        return etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return None


def _body(root: etree._Element) -> etree._Element | None:
    if local(root.tag) != "Envelope":
        return None
    for child in root:
        if local(child.tag) == "Body":
            return child
    return None


def _child(element: etree._Element, name: str) -> etree._Element | None:
    for child in element:
        if local(child.tag) == name:
            return child
    return None


def _all_text(element: etree._Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def find_fault(root: etree._Element) -> SoapFault | None:
    body = _body(root)
    if body is None:
        return None
    fault = next((c for c in body if local(c.tag) == "Fault" and etree.QName(c).namespace in (SOAP11_NS, SOAP12_NS)), None)
    if fault is None:
        return None
    if etree.QName(fault).namespace == SOAP12_NS:
        code_el = _child(fault, "Code")
        value = _child(code_el, "Value") if code_el is not None else None
        reason = _child(fault, "Reason")
        text = _child(reason, "Text") if reason is not None else None
        code, message, detail = _all_text(value), _all_text(text), _child(fault, "Detail")
    else:
        code, message, detail = _all_text(_child(fault, "faultcode")), _all_text(_child(fault, "faultstring")), _child(fault, "detail")
    return SoapFault(
        code=code.rsplit(":", 1)[-1] or "Server",
        message=message or "the upstream answered with a SOAP fault",
        detail=element_to_json(detail, None) if detail is not None else None,
    )


def find_result(root: etree._Element, name: str | None) -> etree._Element | None:
    """The element the tool answers with: the first ``name`` anywhere in the Body (so a wrapper the
    WSDL does not mention does not matter), or the Body's first element."""
    body = _body(root)
    if body is None:
        return None
    if name is None:
        return next((c for c in body if isinstance(c.tag, str)), None)
    return next((e for e in body.iter() if local(e.tag) == name), None)


# -- XML → JSON ------------------------------------------------------------------------------


def _types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    return [kind] if isinstance(kind, str) else [k for k in kind if isinstance(k, str)] if isinstance(kind, list) else []


_MAX_DIGITS = 4000  # of an integer turned into a JSON number (Python's int/str limit is 4,300)


def _scalar(text: str, schema: Any) -> Any:
    kinds = _types(schema)
    if not kinds or "string" in kinds:
        return text
    stripped = text.strip()
    if stripped == "":
        return None
    if "integer" in kinds or "number" in kinds:
        try:
            number = Decimal(stripped)
        except InvalidOperation:
            return text
        # Bounded first: "1e600000" is 8 bytes, and its int() holds the GIL for a minute (quadratic in
        # the digits); one past Python's 4,300 digits, or a float past 1.8e308, is no JSON number.
        if number.is_finite() and number.adjusted() < _MAX_DIGITS:
            if number == number.to_integral_value() and ("integer" in kinds or not any(c in stripped for c in ".eE")):
                return int(number)
            if "number" in kinds and math.isfinite(as_float := float(number)):
                return as_float
        return text  # kept as the upstream wrote it (its drift rules judge it)
    if "boolean" in kinds:
        lowered = stripped.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    return text


# A schema's property names folded, per properties mapping (the catalog's, long-lived): built once, not
# for every element of an answer (a 10 MB answer of a 60-property schema took 13 s rebuilding them).
_FOLDED: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}


def _folded(properties: dict[str, Any]) -> dict[str, str]:
    held = _FOLDED.get(id(properties))
    if held is not None and held[0] is properties:  # the mapping itself is held: its id is not reused
        return held[1]
    lowered = {_fold(key): key for key in properties}
    if len(_FOLDED) >= 4096:
        _FOLDED.clear()
    _FOLDED[id(properties)] = (properties, lowered)
    return lowered


def _property(properties: dict[str, Any], name: str, attribute: bool) -> tuple[str, Any]:
    candidates = ["@" + name, name] if attribute else [name]
    for candidate in candidates:
        if candidate in properties:
            return candidate, properties[candidate]
    lowered = _folded(properties)
    for candidate in candidates:
        key = lowered.get(_fold(candidate))
        if key is not None:
            return key, properties[key]
    if not attribute:  # repeated <Item> elements collected by an array property "items"
        key = lowered.get(_fold(name) + "s")
        if key is not None and "array" in _types(properties[key]):
            return key, properties[key]
    if name == "#text" and "value" in properties:
        return "value", properties["value"]
    return ("@" + name if attribute else name), None


def _elements(element: etree._Element) -> list[etree._Element]:
    return [child for child in element if isinstance(child.tag, str)]


def _unwrap(element: etree._Element, item_schema: Any) -> list[etree._Element] | None:
    """The repeated children of a wrapper element, when ``element`` is one (``<Bins><Bin/>...``)."""
    children = _elements(element)
    names = {local(c.tag) for c in children}
    if len(names) != 1:
        return None
    item_properties = item_schema.get("properties") if isinstance(item_schema, dict) else None
    if isinstance(item_properties, dict) and _property(item_properties, names.pop(), False)[1] is not None:
        return None  # the child is a field of the item, not an item
    return children


def element_to_json(element: etree._Element, schema: Any) -> Any:
    if element.get(f"{{{XSI_NS}}}nil") in ("true", "1"):
        return None
    kinds = _types(schema)
    children = _elements(element)
    if "array" in kinds and not ("object" in kinds and not children):
        items = schema.get("items") if isinstance(schema, dict) else None
        return [element_to_json(child, items) for child in children]
    attributes = {local(k): v for k, v in element.attrib.items() if etree.QName(k).namespace != XSI_NS}
    text = element.text or ""
    if not children and not attributes:
        return _scalar(text, schema)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    properties = properties if isinstance(properties, dict) else {}
    result: dict[str, Any] = {}
    for name, value in attributes.items():
        key, sub = _property(properties, name, attribute=True)
        result[key] = _scalar(value, sub)
    groups: dict[str, list[etree._Element]] = {}
    for child in children:
        groups.setdefault(local(child.tag), []).append(child)
    for name, members in groups.items():
        key, sub = _property(properties, name, attribute=False)
        if "array" in _types(sub):
            items = sub.get("items")
            if len(members) == 1 and (inner := _unwrap(members[0], items)) is not None:
                members = inner
            result[key] = [element_to_json(member, items) for member in members]
        elif len(members) > 1:
            result[key] = [element_to_json(member, sub) for member in members]
        else:
            result[key] = element_to_json(members[0], sub)
    if text.strip():
        key, sub = _property(properties, "#text", attribute=False)
        result[key] = _scalar(text.strip(), sub)
    return result
