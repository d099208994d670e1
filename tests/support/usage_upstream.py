"""An upstream that reports whatever usage a test asks for, lies included: a real HTTP server on
loopback for the usage-rule tests (``catalog.usage``).

``GET /usage/{mode}``:

* ``json-N``: ``{"usage": {"units": N}}``; ``header-N``: header ``X-Units: N``;
* ``missing``: no usage at all; ``string``: ``"units": "lots"``; ``negative``: ``-3``;
  ``fraction``: ``2.5``; ``huge``: 10**60; ``notjson``: a text answer.

Every answer carries a unique marker (``served``), so a test can tell whether upstream content
reached the payer; ``calls`` counts calls per mode.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["UsageUpstream"]

_LIES: dict[str, Any] = {"string": "lots", "negative": -3, "huge": 10**60}


class UsageUpstream:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._markers = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/usage/{mode}", self.usage, methods=["GET"])])

    async def usage(self, request: Request) -> Response:
        mode = request.path_params["mode"]
        self.calls[mode] += 1
        marker = f"USAGE-CONTENT-{next(self._markers)}"
        kind, _, number = mode.partition("-")
        if kind == "header" and number.isdigit():
            return JSONResponse({"served": marker}, headers={"X-Units": number})
        if kind == "json" and number.isdigit():
            return JSONResponse({"served": marker, "usage": {"units": int(number)}})
        if mode == "fraction":
            return Response(f'{{"served": "{marker}", "usage": {{"units": 2.5}}}}', media_type="application/json")
        if mode in _LIES:
            return JSONResponse({"served": marker, "usage": {"units": _LIES[mode]}})
        if mode == "notjson":
            return PlainTextResponse(f"{marker}: no usage here")
        return JSONResponse({"served": marker})
