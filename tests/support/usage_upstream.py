"""An upstream that reports whatever usage a test asks for, lies included: a real HTTP server on
loopback for the usage-rule tests (``catalog.usage``).

``GET /usage/{mode}``:

* ``json-N``: ``{"usage": {"units": N}}``; ``header-N``: header ``X-Units: N``;
* ``missing``: no usage at all; ``string``: ``"units": "lots"``; ``negative``: ``-3``;
  ``fraction``: ``2.5``; ``huge``: 10**60; ``notjson``: a text answer.

``GET /stream/{n}``: ``n`` SSE events, event ``i`` with ``{"i": i, "usage": {"units": i}}``, then
``data: [DONE]``; ``?fail_after=k``: the connection breaks off after ``k`` events; ``?hold_after=k``:
after ``k`` events it waits for ``release()`` (a payer that leaves mid-stream); ``?pace_ms=m``: ``m``
ms between events (an upstream slower than its whole stream may take).

Every answer carries a unique marker (``served``), so a test can tell whether upstream content
reached the payer; ``calls`` counts calls per mode (``stream-n`` for streams).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["UsageUpstream"]

_LIES: dict[str, Any] = {"string": "lots", "negative": -3, "huge": 10**60}


class UsageUpstream:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._markers = itertools.count(1)

        self.held = threading.Event()
        self.finished: list[int] = []  # events sent by each stream that ended, in order

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/usage/{mode}", self.usage, methods=["GET"]),
                                 Route("/stream/{n:int}", self.stream, methods=["GET"])])

    def release(self) -> None:
        self.held.set()

    async def stream(self, request: Request) -> Response:
        n = request.path_params["n"]
        self.calls[f"stream-{n}"] += 1
        fail_after = int(request.query_params.get("fail_after", -1))
        hold_after = int(request.query_params.get("hold_after", -1))
        pace = int(request.query_params.get("pace_ms", 0)) / 1000  # a slow upstream: this long between events

        async def events() -> AsyncIterator[bytes]:
            sent = 0
            try:
                for i in range(1, n + 1):
                    if i - 1 == fail_after:
                        raise ConnectionAbortedError("the upstream breaks off mid-stream")
                    if i - 1 == hold_after:
                        await asyncio.to_thread(self.held.wait, 30)
                    if pace and i > 1:
                        await asyncio.sleep(pace)
                    yield f'data: {{"i": {i}, "usage": {{"units": {i}}}}}\n\n'.encode()
                    sent = i
                yield b"data: [DONE]\n\n"
            finally:
                self.finished.append(sent)

        return StreamingResponse(events(), media_type="text/event-stream")

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
