"""The request router.

Built once from the catalog's tools. Fully literal paths sit in a dict; templated ones in a
per-segment trie, so a lookup costs the depth of the path, not the number of tools. The
router sees an already-decoded path and refuses anything with empty, '.' or '..' segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from catalog.models import Tool
from catalog.templates import parse_template

__all__ = ["RouteMatch", "Router"]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    tool: Tool
    params: dict[str, str]


def _split_request_path(path: str) -> list[str] | None:
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    if any(s in ("", ".", "..") for s in segments):
        return None
    return segments


class Router:
    """The trie's nodes are numbers, and its edges and routes sit in dicts keyed by them, one per
    literal segment and per method (the number-to-number ones the cycle collector does not even
    track): 10,000 routes make no object per node or route, where node objects with their own
    dicts made 60,000 for every collection to scan and the process to keep."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self._literal: dict[str, dict[str, Tool]] = {}  # method → fully literal path → tool
        self._children: dict[str, dict[int, int]] = {}  # literal segment → node → its child
        self._param_child: dict[int, int] = {}  # node → its {param} child
        self._routes: dict[str, dict[int, Tool]] = {}  # method → node → tool
        self._names: dict[str, dict[int, tuple[str, ...]]] = {}  # method → node → param names
        self._methods: dict[int, str] = {}  # node with routes → their methods, space-separated
        self._shared_names: dict[tuple[str, ...], tuple[str, ...]] = {}  # ("symbol",) once
        self._nodes = 1  # node 0 is the root
        self._size = 0
        for tool in tools:
            self._add(tool)

    def _add(self, tool: Tool) -> None:
        method = tool.method.upper()
        segments = parse_template(tool.path)
        if not any(s.is_param for s in segments):
            paths = self._literal.setdefault(method, {})
            if tool.path in paths:
                raise ValueError(f"route {method} {tool.path} is defined twice")
            paths[tool.path] = tool
        else:
            node = 0
            for segment in segments:
                edges = self._param_child if segment.is_param else self._children.setdefault(segment.value, {})
                child = edges.get(node)
                if child is None:
                    child = edges[node] = self._nodes
                    self._nodes += 1
                node = child
            routes = self._routes.setdefault(method, {})
            if node in routes:
                raise ValueError(f"route {method} {tool.path} collides with {routes[node].path}")
            routes[node] = tool
            names = tuple(s.value for s in segments if s.is_param)
            self._names.setdefault(method, {})[node] = self._shared_names.setdefault(names, names)
            self._methods[node] = f"{self._methods.get(node, '')} {method}".lstrip()
        self._size += 1

    def __len__(self) -> int:
        return self._size

    def _leaves(self, node: int, segments: list[str], i: int, values: list[str]) -> Iterator[tuple[int, list[str]]]:
        # Depth-first, literal child before the param child: the first leaf found is the most
        # specific route. Backtracking is bounded by the template depth, never by tool count.
        if i == len(segments):
            if node in self._methods:
                yield node, values
            return
        edges = self._children.get(segments[i])
        child = edges.get(node) if edges is not None else None
        if child is not None:
            yield from self._leaves(child, segments, i + 1, values)
        param = self._param_child.get(node)
        if param is not None:
            yield from self._leaves(param, segments, i + 1, [*values, segments[i]])

    def match(self, method: str, path: str) -> RouteMatch | None:
        segments = _split_request_path(path)
        if segments is None:
            return None
        method = method.upper()
        wanted = "GET" if method == "HEAD" else method
        literal = self._literal.get(wanted)
        tool = literal.get(path) if literal is not None else None
        if tool is not None:
            return RouteMatch(tool, {})
        routes = self._routes.get(wanted)
        if routes is None:
            return None
        for node, values in self._leaves(0, segments, 0, []):
            tool = routes.get(node)
            if tool is not None:
                return RouteMatch(tool, dict(zip(self._names[wanted][node], values, strict=True)))
        return None

    def allowed_methods(self, path: str) -> set[str]:
        """Methods some route accepts at ``path``; empty means 404, non-empty without yours 405."""
        segments = _split_request_path(path)
        if segments is None:
            return set()
        methods = {method for method, paths in self._literal.items() if path in paths}
        for node, _ in self._leaves(0, segments, 0, []):
            methods.update(self._methods[node].split())
        if "GET" in methods:
            methods.add("HEAD")
        return methods
