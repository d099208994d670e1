"""JSON and XML pieces of an upstream call: exact decimals in JSON bodies, JSON pointers, the text of
an argument in a path or query, and the values failure rules read."""

from __future__ import annotations

import json
import re
import secrets
from decimal import Decimal
from typing import Any

from lxml import etree

__all__ = ["MISSING", "dumps", "json_or_none", "resolve_pointer", "set_pointer", "text", "xpath_value"]


def dumps(value: Any) -> bytes:
    """Compact JSON. Decimals (request bodies are parsed with them) are written with their own
    digits, never rounded through a binary float: each goes out as a tagged string, swapped for
    its digits afterwards (the tag is random per call, so no string of the caller's can match)."""
    numbers: list[str] = []
    tag = secrets.token_hex(8)

    def default(item: Any) -> Any:
        if isinstance(item, Decimal):
            if not item.is_finite():
                raise ValueError("a JSON number must be finite")
            numbers.append(str(item))  # always a valid JSON number: 1.50, -0, 1E+2, 5E-7
            return f"{tag}:{len(numbers) - 1}"
        raise TypeError(type(item).__name__)

    text = json.dumps(value, separators=(",", ":"), default=default, allow_nan=False)
    if numbers:
        text = re.sub(f'"{tag}:([0-9]+)"', lambda match: numbers[int(match.group(1))], text)
    return text.encode()


def text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _pointer_parts(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


MISSING = object()


def resolve_pointer(document: Any, pointer: str) -> Any:
    node = document
    for part in _pointer_parts(pointer):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def set_pointer(document: dict[str, Any], pointer: str, value: Any) -> None:
    parts = _pointer_parts(pointer)
    node = document
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def xpath_value(found: Any) -> str | None:
    if isinstance(found, list):
        if not found:
            return None
        first = found[0]
        if isinstance(first, etree._Element):
            return " ".join("".join(first.itertext()).split())
        return str(first)
    if isinstance(found, bool):
        return "true" if found else "false"
    return None if found is None else str(found)
