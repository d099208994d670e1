"""Path templates and the request router.

Built once from the catalog's tools. Fully literal paths sit in a dict; templated ones in a
per-segment trie, so a lookup costs the depth of the path, not the number of tools. The
router sees an already-decoded path and refuses anything with empty, '.' or '..' segments.
"""

from __future__ import annotations

import functools

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from catalog.models import Tool

__all__ = ["RouteMatch", "Router", "Segment", "parse_template", "route_shape"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
# RFC 3986 pchar without '%': no encoded forms, so a template means exactly what it says.
_LITERAL = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


class Segment(NamedTuple):
    value: str  # the literal text, or the parameter name
    is_param: bool


def parse_template(path: str, *, allow_trailing_slash: bool = False) -> tuple[Segment, ...]:
    if not isinstance(path, str):
        raise ValueError(f"path {path!r} must start with '/'")
    return _parse_template(path, allow_trailing_slash)


@functools.lru_cache(maxsize=65536)
def _parse_template(path: str, allow_trailing_slash: bool) -> tuple[Segment, ...]:
    """Split ``/quotes/{symbol}`` into segments; ValueError with a readable reason if invalid."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path {path!r} must start with '/'")
    for char in "?#%":
        if char in path:
            raise ValueError(f"path {path!r} must not contain {char!r}")
    raw = path[1:].split("/")
    if allow_trailing_slash and raw[-1] == "" and len(raw) > 1:
        raw = raw[:-1]
    segments: list[Segment] = []
    names: set[str] = set()
    for text in raw:
        if text == "":
            raise ValueError(f"path {path!r} has an empty segment")
        if text in (".", ".."):
            raise ValueError(f"path {path!r} must not contain '.' or '..' segments")
        param = _PARAM.fullmatch(text)
        if param:
            name = param.group(1)
            if name in names:
                raise ValueError(f"path {path!r} uses parameter {{{name}}} twice")
            names.add(name)
            segments.append(Segment(name, True))
        elif _LITERAL.fullmatch(text):
            segments.append(Segment(text, False))
        else:
            raise ValueError(
                f"path {path!r}: segment {text!r} must be a literal or a whole {{param}} "
                "(param names: letters, digits, '_')"
            )
    return tuple(segments)


def route_shape(method: str, path: str) -> tuple[str, tuple[str | None, ...]]:
    """Key under which two routes collide: ``/a/{x}`` and ``/a/{y}`` have the same shape."""
    return method.upper(), tuple(None if s.is_param else s.value for s in parse_template(path))


@dataclass(frozen=True, slots=True)
class RouteMatch:
    tool: Tool
    params: dict[str, str]


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    routes: dict[str, tuple[Tool, tuple[str, ...]]] = field(default_factory=dict)


def _split_request_path(path: str) -> list[str] | None:
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    if any(s in ("", ".", "..") for s in segments):
        return None
    return segments


class Router:
    def __init__(self, tools: Iterable[Tool]) -> None:
        self._literal: dict[str, dict[str, Tool]] = {}
        self._root = _Node()
        self._size = 0
        for tool in tools:
            self._add(tool)

    def _add(self, tool: Tool) -> None:
        method = tool.method.upper()
        segments = parse_template(tool.path)
        if not any(s.is_param for s in segments):
            by_method = self._literal.setdefault(tool.path, {})
            if method in by_method:
                raise ValueError(f"route {method} {tool.path} is defined twice")
            by_method[method] = tool
        else:
            node = self._root
            for segment in segments:
                if segment.is_param:
                    node.param = node.param or _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(segment.value, _Node())
            if method in node.routes:
                raise ValueError(f"route {method} {tool.path} collides with {node.routes[method][0].path}")
            node.routes[method] = (tool, tuple(s.value for s in segments if s.is_param))
        self._size += 1

    def __len__(self) -> int:
        return self._size

    def _leaves(self, node: _Node, segments: list[str], i: int, values: list[str]) -> Iterator[tuple[_Node, list[str]]]:
        # Depth-first, literal child before the param child: the first leaf found is the most
        # specific route. Backtracking is bounded by the template depth, never by tool count.
        if i == len(segments):
            if node.routes:
                yield node, values
            return
        child = node.literal.get(segments[i])
        if child is not None:
            yield from self._leaves(child, segments, i + 1, values)
        if node.param is not None:
            yield from self._leaves(node.param, segments, i + 1, [*values, segments[i]])

    def match(self, method: str, path: str) -> RouteMatch | None:
        segments = _split_request_path(path)
        if segments is None:
            return None
        method = method.upper()
        wanted = "GET" if method == "HEAD" else method
        literal = self._literal.get(path)
        if literal is not None and wanted in literal:
            return RouteMatch(literal[wanted], {})
        for node, values in self._leaves(self._root, segments, 0, []):
            route = node.routes.get(wanted)
            if route is not None:
                tool, names = route
                return RouteMatch(tool, dict(zip(names, values, strict=True)))
        return None

    def allowed_methods(self, path: str) -> set[str]:
        """Methods some route accepts at ``path``; empty means 404, non-empty without yours 405."""
        segments = _split_request_path(path)
        if segments is None:
            return set()
        methods = set(self._literal.get(path, {}))
        for node, _ in self._leaves(self._root, segments, 0, []):
            methods.update(node.routes)
        if "GET" in methods:
            methods.add("HEAD")
        return methods
