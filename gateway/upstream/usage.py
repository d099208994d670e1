"""Reading a call's usage from the upstream's answer, per the tool's ``usage`` rule (``catalog.usage``).

``read_units`` takes a buffered answer (``from: header | json | element``); ``StreamMeter`` counts a
stream as it is relayed (``from: events | event_field | bytes``). Both raise or report
``UsageError`` with a stable ``usage_*`` code; the pipeline decides what the rule says to do then.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from catalog.usage import UsageError, UsageRule, parse_units
from gateway.upstream.documents import MISSING, resolve_pointer
from gateway.upstream.transport import UpstreamResponse

__all__ = ["StreamMeter", "UsageError", "read_pointer", "read_units"]

def read_pointer(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer; ``UsageError`` (``usage_missing``) when a step is absent."""
    value = resolve_pointer(document, pointer)
    if value is MISSING:
        raise UsageError("usage_missing", f"the answer has no usage at {pointer}")
    return value


def _document(body: bytes) -> Any:
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UsageError("usage_missing", "the answer is not JSON, so it says no usage") from None


def read_units(rule: UsageRule, response: UpstreamResponse) -> int:
    """The units a buffered answer reports, per ``rule``. Raises ``UsageError``."""
    if rule.source == "header":
        assert rule.header is not None
        value = response.header(rule.header.lower())
        if value is None:
            raise UsageError("usage_missing", f"the answer has no {rule.header} header")
        return parse_units(value)
    pointer = rule.json_pointer
    assert pointer is not None
    document = _document(response.body)
    if rule.source == "element":  # a SOAP element: the bridge may have named it as the output schema does
        return parse_units(_element(document, pointer))
    return parse_units(read_pointer(document, pointer))


def _element(document: Any, pointer: str) -> Any:
    """The value at ``pointer`` with each step matched without regard to case (``Reserved`` is
    ``reserved`` once the SOAP bridge named it after the tool's output schema)."""
    value = document
    for step in pointer.split("/")[1:]:
        if isinstance(value, dict):
            key = step if step in value else next((k for k in value if k.lower() == step.lower()), None)
            if key is not None:
                value = value[key]
                continue
        raise UsageError("usage_missing", f"the answer has no element {pointer.lstrip('/')}")
    return value


class StreamMeter:
    """Counts a relayed stream's units as its chunks are delivered: SSE data events (``events``),
    body bytes (``bytes``), or the last value of ``pointer`` in an event's JSON (``event_field``).
    ``delivered`` is what the client has received; ``error`` the first unreadable usage seen."""

    def __init__(self, rule: UsageRule) -> None:
        self.rule = rule
        self.delivered = 0
        self.reported: int | None = None  # event_field: the last usage an event reported
        self.error: UsageError | None = None
        self._pending = b""  # an SSE event not yet complete

    def feed(self, chunk: bytes) -> None:
        """A chunk the client received."""
        if self.rule.source == "bytes":
            self.delivered += len(chunk)
            return
        self._pending += chunk
        *events, self._pending = self._pending.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, raw: bytes) -> None:
        data = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
        if not data:
            return  # a comment, a retry or an event name alone: not a data event
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            return
        if self.rule.source == "events":
            self.delivered += 1
            return
        pointer = self.rule.json_pointer
        assert pointer is not None
        try:
            self.reported = parse_units(read_pointer(json.loads(payload, parse_float=Decimal), pointer))
        except UsageError as err:
            if err.code != "usage_missing":
                self.error = err  # a usage that is there but a lie: remembered, fail closed or default
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass  # an event that is not JSON says nothing about usage

    def units(self) -> int:
        """The units so far. Raises ``UsageError`` when the rule reads a field none reported."""
        if self.rule.source != "event_field":
            return self.delivered
        if self.error is not None:
            raise self.error
        if self.reported is None:
            raise UsageError("usage_missing", f"no event of the stream reported usage at {self.rule.json_pointer}")
        return self.reported
