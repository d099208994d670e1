"""One tool call, split the way HTTP carries it: path parameters in the path, the other arguments
in a JSON body (POST, PUT, PATCH) or the query string. Used by MCP and the reference agent, so every
surface turns arguments into the same request."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from catalog import Tool
from catalog.answers import RESERVED_PREFIX
from gateway.errors import GatewayError
from gateway.protocol.bazaar import carries_body
from gateway.upstream.trimming import answer_parameters

__all__ = ["ToolRequest", "advertised_schema", "input_properties", "required_inputs", "tool_request"]


def advertised_schema(tool: Tool) -> dict[str, Any]:
    """The tool's input schema as discovery gives it: with the gateway's x402gw_* parameters
    (trimming of the answer) for a tool that takes them; else the catalog's, unchanged."""
    extra = answer_parameters(tool)
    if not extra:
        return tool.input_schema
    return {**tool.input_schema, "properties": {**input_properties(tool), **extra}}


def input_properties(tool: Tool) -> dict[str, Any]:
    properties = (tool.input_schema or {}).get("properties")
    return properties if isinstance(properties, dict) else {}


def required_inputs(tool: Tool) -> list[str]:
    required = (tool.input_schema or {}).get("required")
    return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []


def _path_params_schema(tool: Tool) -> dict[str, Any]:
    properties = input_properties(tool)
    return {
        "type": "object",
        "properties": {name: properties.get(name, {"type": "string"}) for name in tool.path_params},
        "required": list(tool.path_params),
    }


_TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The HTTP request equivalent to calling a tool with some arguments."""

    method: str
    path: str
    query: str
    body: bytes

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def tool_request(method: str, path_template: str, arguments: dict[str, Any]) -> ToolRequest:
    """Path parameters fill the template; the other arguments go to a JSON body (POST, PUT,
    PATCH) or the query string; the gateway's own x402gw_* parameters always go in the query. Deterministic (sorted keys), so the same arguments always make the
    same request, and a payment bound to one is accepted on its re-sending. A path argument that is
    missing is a GatewayError (invalid_arguments), never a literal ``{name}`` sent on."""
    method = method.upper()
    path = path_template
    rest: dict[str, Any] = {}
    reserved: dict[str, Any] = {}
    for name, value in arguments.items():
        token = "{" + name + "}"
        if token in path:
            path = path.replace(token, quote(_text(value), safe=""))
        elif name.startswith(RESERVED_PREFIX):
            reserved[name] = value
        else:
            rest[name] = value
    missing = _TEMPLATE_PARAM.findall(path)
    if missing:
        raise GatewayError(
            "invalid_arguments", f"missing path argument(s): {', '.join(missing)}",
            fields=[{"field": name, "problem": "required (part of the path)"} for name in missing],
        )
    if carries_body(method):
        body = json.dumps(rest, separators=(",", ":"), sort_keys=True).encode() if rest else b""
        return ToolRequest(method, path, _query(reserved), body)
    return ToolRequest(method, path, _query({**rest, **reserved}), b"")


def _query(arguments: dict[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for name in sorted(arguments):
        value = arguments[name]
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, _text(item)))
    return urlencode(pairs)
