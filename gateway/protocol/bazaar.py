"""The bazaar extension of a 402 (x402 §6.2): how to call a resource and what it answers.

Part of every offer (``gateway.protocol.offers``) and of the discovery documents
(``gateway.surfaces.discovery``), so it lives here, below both: the offers never import a surface.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from catalog import Tool

__all__ = ["BAZAAR", "BODY_METHODS", "bazaar_extension", "carries_body", "schema_without"]

BAZAAR = "bazaar"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def carries_body(method: str) -> bool:
    return method.upper() in BODY_METHODS


def schema_without(schema: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The input schema minus the path parameters: what the query string or the body carries."""
    names = set(names)
    rest = copy.deepcopy(schema)
    if names and isinstance(rest.get("properties"), dict):
        rest["properties"] = {k: v for k, v in rest["properties"].items() if k not in names}
    if names and isinstance(rest.get("required"), list):
        rest["required"] = [r for r in rest["required"] if r not in names]
        if not rest["required"]:
            del rest["required"]
    rest.setdefault("type", "object")
    return rest


def _compact(schema: Any) -> Any:
    """A schema without its prose (``description``, ``examples``, ``title``): clients echo extensions
    in PAYMENT-SIGNATURE, so the 402's copy stays small; the prose is in /tools and /openapi.json."""
    if isinstance(schema, dict):
        return {k: _compact(v) for k, v in schema.items()
                if not (k in ("description", "title") and isinstance(v, str)) and k != "examples"}
    if isinstance(schema, list):
        return [_compact(v) for v in schema]
    return schema


def bazaar_extension(tool: Tool) -> dict[str, Any]:
    """``extensions.bazaar = {info, schema}``: how to call this resource and what it answers."""
    input_info: dict[str, Any] = {"type": "http", "method": tool.method}
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "const": "http"},
            "method": {"type": "string", "enum": [tool.method]},
        },
        "required": ["type", "method"],
    }
    rest = _compact(schema_without(tool.input_schema, tool.path_params))
    if tool.path_params:
        input_info["pathParams"] = {name: "{" + name + "}" for name in tool.path_params}
        input_schema["properties"]["pathParams"] = {
            "type": "object",
            "properties": {name: {"type": "string"} for name in tool.path_params},
        }
    if carries_body(tool.method):
        input_info.update(bodyType="json", body={})
        input_schema["properties"]["bodyType"] = {"type": "string", "enum": ["json"]}
        input_schema["properties"]["body"] = rest
        input_schema["required"] += ["bodyType", "body"]
    elif rest.get("properties"):
        input_schema["properties"]["queryParams"] = {"type": "object", **{k: v for k, v in rest.items() if k != "type"}}
    info: dict[str, Any] = {"input": input_info, "output": {"type": "json"}}
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"input": input_schema, "output": {"type": "object"}},
        "required": ["input"],
    }
    if tool.output_schema:
        schema["properties"]["output"] = {
            "type": "object",
            "properties": {"type": {"type": "string"}, "schema": _compact(tool.output_schema)},
        }
    return {"info": info, "schema": schema}
