"""Checks across several catalog files (several owners, or one owner's several files): what one file
alone cannot see. A tool's name and its route (method and path shape) are the gateway's, once; an
owner's upstream name is one upstream (its credentials and breaker are kept per owner and name, so a
second, different definition would get the first one's API key and share its breaker); and no
owner's route may take requests another owner's published route answers (a literal path beside
another owner's template would win the router and sell that owner's calls to its own payTo).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence

from catalog.models import Catalog, Tool
from catalog.routing import Router
from catalog.source import Source
from catalog.templates import route_shape

__all__ = ["across_files"]

_PARAM = re.compile(r"\{[^}]*\}")
_PROBE = "x402gw-probe"  # what a path parameter is replaced with to ask another owner's router
_ENOUGH = 200  # overlaps reported before the search stops (a catalog that far off is fixed as a whole)


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
    reported: set[tuple[int, int, str]] = set()

    def report(src: Source, index: int, tool: Tool, other: Tool) -> None:
        if (id(src), index, other.name) not in reported:
            reported.add((id(src), index, other.name))
            src.issue(f"tools[{index}].path", "route_overlaps_owner",
                      f"route {tool.method} {tool.path} takes requests owner {other.owner!r}'s tool {other.name!r} "
                      f"({other.method} {other.path}) answers: choose a path of your own")

    templated: dict[tuple[str, int], list[tuple[Source, int, Tool, tuple[str | None, ...]]]] = {}
    for catalog, src in loaded:
        for index, tool in enumerate(catalog.tools):
            probe = _PARAM.sub(_PROBE, tool.path)
            for owner, router in routers.items():
                found = None if owner == tool.owner else router.match(tool.method, probe)
                if found is not None and route_shape(tool.method, tool.path) != route_shape(found.tool.method, found.tool.path):
                    report(src, index, tool, found.tool)  # (the same shape is a duplicate_route, reported above)
            method, shape = route_shape(tool.method, tool.path)
            if None in shape:
                templated.setdefault((method, len(shape)), []).append((src, index, tool, shape))
    # Two templates can share paths neither probe finds (/{x}/AAPL and /q/{s} both take /q/AAPL):
    # the path made of both routes' literals is asked of the two, and the one the router picks takes it.
    # Owner by owner (one owner's routes are its own to arrange); enough reported stops the search.
    for members in templated.values():
        owners: dict[str, list[_Member]] = {}
        for member in members:
            owners.setdefault(member[2].owner, []).append(member)
        for one, other in itertools.combinations(owners.values(), 2):
            for (src_a, index_a, a, shape_a), (src_b, index_b, b, shape_b) in _compatible(one, other, 0, False):
                shared = None if shape_a == shape_b else _shared_path(shape_a, shape_b)
                found = None if shared is None else Router([a, b]).match(a.method, shared)
                if found is not None:
                    winner, loser = (a, b) if found.tool is a else (b, a)
                    report(src_a if winner is a else src_b, index_a if winner is a else index_b, winner, loser)
                if len(reported) >= _ENOUGH:
                    return


_Member = tuple[Source, int, Tool, tuple[str | None, ...]]


def _compatible(xs: list[_Member], ys: list[_Member], pos: int, same: bool) -> Iterator[tuple[_Member, _Member]]:
    """The pairs of ``xs`` and ``ys`` (of one width) whose segments from ``pos`` on are equal literals or
    a parameter on either side, each once (``same``: ``xs`` is ``ys``, unordered pairs): split by the
    segment at ``pos``, as a trie would, so a catalog's unrelated routes are never compared."""
    if not xs or not ys:
        return
    if pos == len(xs[0][3]):
        yield from (itertools.combinations(xs, 2) if same else itertools.product(xs, ys))
        return
    x_lit, x_par = _split(xs, pos)
    y_lit, y_par = (x_lit, x_par) if same else _split(ys, pos)
    for literal, x_group in x_lit.items():
        yield from _compatible(x_group, y_lit.get(literal, []), pos + 1, same)
        yield from _compatible(x_group, y_par, pos + 1, False)
    if not same:
        for y_group in y_lit.values():
            yield from _compatible(x_par, y_group, pos + 1, False)
    yield from _compatible(x_par, y_par, pos + 1, same)


def _split(members: list[_Member], pos: int) -> tuple[dict[str, list[_Member]], list[_Member]]:
    literal: dict[str, list[_Member]] = {}
    params: list[_Member] = []
    for member in members:
        segment = member[3][pos]
        (params if segment is None else literal.setdefault(segment, [])).append(member)
    return literal, params


def _shared_path(a: tuple[str | None, ...], b: tuple[str | None, ...]) -> str | None:
    """A path both shapes match (each segment: the literal either has, else the probe); None: none."""
    segments = []
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None and x != y:
            return None
        segments.append(x if x is not None else y if y is not None else _PROBE)
    return "/" + "/".join(segments)
