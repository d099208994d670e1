"""Checks across several catalog files (several owners, or one owner's several files): what one file
alone cannot see. A tool's name and its route (method and path shape) are the gateway's, once; an
owner's upstream name is one upstream (its credentials and breaker are kept per owner and name, so a
second, different definition would get the first one's API key and share its breaker); and no
owner's route may take requests another owner's published route answers (a literal path beside
another owner's template would win the router and sell that owner's calls to its own payTo).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from catalog.models import Catalog, Tool
from catalog.routing import Router
from catalog.source import Source
from catalog.templates import route_shape

__all__ = ["across_files"]

_PARAM = re.compile(r"\{[^}]*\}")
_PROBE = "x402gw-probe"  # what a path parameter is replaced with to ask another owner's router


def across_files(loaded: Sequence[tuple[Catalog, Source]]) -> None:
    """Adds to each file's ``Source`` the issues that only several files together show."""
    names: dict[str, str] = {}
    routes: dict[tuple[str, tuple[str | None, ...]], tuple[str, str]] = {}
    upstreams: dict[tuple[str, str], tuple[object, str]] = {}
    by_owner: dict[str, list[Tool]] = {}
    for catalog, src in loaded:
        flagged: set[str] = set()
        for index, tool in enumerate(catalog.tools):
            if tool.name in names:
                src.issue(f"tools[{index}].name", "duplicate_tool", f"tool name {tool.name!r} is already used in {names[tool.name]}")
            names.setdefault(tool.name, catalog.source)
            shape = route_shape(tool.method, tool.path)
            if shape in routes:
                source, other = routes[shape]
                src.issue(f"tools[{index}].path", "duplicate_route", f"route {tool.method} {tool.path} collides with tool {other!r} in {source}")
            routes.setdefault(shape, (catalog.source, tool.name))
            upstream = tool.upstream
            first, where = upstreams.setdefault((tool.owner, upstream.name), (upstream, catalog.source))
            if first != upstream and upstream.name not in flagged:
                flagged.add(upstream.name)
                src.issue(f"upstreams.{upstream.name}", "upstream_conflict",
                          f"owner {tool.owner!r} defines upstream {upstream.name!r} differently in {where}: one owner's "
                          f"upstream name is one upstream (its credentials and circuit breaker); rename one")
            by_owner.setdefault(tool.owner, []).append(tool)
    if len(by_owner) > 1:
        _overlaps(loaded, by_owner)


def _overlaps(loaded: Sequence[tuple[Catalog, Source]], by_owner: dict[str, list[Tool]]) -> None:
    try:
        routers = {owner: Router(tools) for owner, tools in by_owner.items()}
    except ValueError:
        return  # a duplicate route: reported above
    for catalog, src in loaded:
        for index, tool in enumerate(catalog.tools):
            probe = _PARAM.sub(_PROBE, tool.path)
            for owner, router in routers.items():
                found = None if owner == tool.owner else router.match(tool.method, probe)
                if found is not None and route_shape(tool.method, tool.path) != route_shape(found.tool.method, found.tool.path):
                    # (the same shape is a duplicate_route, reported above)
                    src.issue(f"tools[{index}].path", "route_overlaps_owner",
                              f"route {tool.method} {tool.path} takes requests owner {owner!r}'s tool {found.tool.name!r} "
                              f"({found.tool.method} {found.tool.path}) answers: choose a path of your own")
