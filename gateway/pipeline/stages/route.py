"""Stage ``route``: match method + path against the catalog's router (O(1) in the number of tools).

Reads the raw ASGI path so that encoded separators (``%2F``, ``%5C``) and dot segments can never
smuggle a request past the allow-list. Writes ``ctx.tool``, ``ctx.compiled``, ``ctx.params``.
Stops with 404 (not exposed) or 405 (wrong method).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from catalog import RouteMatch, Router
from gateway.errors import GatewayError
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import RequestContext

__all__ = ["Route", "route"]

_FORBIDDEN_ENCODINGS = (b"%2f", b"%5c", b"%2e", b"%00")


def route(router: Router, method: str, path: str, raw_path: bytes | None) -> RouteMatch:
    if raw_path is not None:
        lowered = raw_path.lower()
        if any(token in lowered for token in _FORBIDDEN_ENCODINGS) or b"\\" in raw_path:
            raise GatewayError("not_found", "no tool is exposed at this path")
    match = router.match(method, path)
    if match is not None:
        return match
    allowed = router.allowed_methods(path)
    if allowed:
        methods = sorted(allowed | ({"HEAD"} if "GET" in allowed else set()))
        raise GatewayError(
            "method_not_allowed",
            f"this path accepts {', '.join(methods)}",
            headers={"Allow": ", ".join(methods)},
            allowed=methods,
        )
    raise GatewayError("not_found", "no tool is exposed at this path; see /tools for what is on sale")


class Route:
    name = "route"
    shape_only = True

    def __init__(self, router: Router, tools: Mapping[str, CompiledTool]) -> None:
        self.router = router
        self.tools = tools

    async def __call__(self, ctx: RequestContext) -> Response | None:
        raw_path = ctx.request.scope.get("raw_path") if ctx.request is not None else None
        match = route(self.router, ctx.method, ctx.path, raw_path)
        ctx.tool, ctx.params = match.tool, match.params
        ctx.compiled = self.tools[match.tool.name]
        return None
