"""A recording upstream for attack tests: a real HTTP server on loopback that logs every call it
gets (method, path, query, body, headers, the gateway's X-Request-Id) and marks every answer it
gives with a unique content marker, so a test can tell upstream content from a gateway error.

Paths are ``/u/<tool>/<rest>``: the tool a call belongs to is read from the path, so a catalog
pointing each tool at its own prefix lets the invariant checker count upstream calls per tool.

Behaviours by tool name (the first path segment after ``/u/``):

* ``redirect*``: 302 with a Location and a body carrying a marker (an unpaid-leak probe).
* ``flaky*``: 503 to the first call of each path, then 200 (an upstream retry).
* ``inject*``: 200 whose headers try to inject ``PAYMENT-RESPONSE``, ``X-PAYMENT-RESPONSE`` and
  ``X402GW-Replay`` into the agent's answer.
* POST/PUT/PATCH/DELETE: 201 echoing the JSON body the upstream received.
* anything else: 200 JSON.

``on(tool, hook)`` runs ``hook(call)`` (synchronously, on a worker thread) when that tool is
called, before answering: tests drain a payer or cancel an authorization mid-call with it.
``observer`` (set by the invariant checker) runs for every call first.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer

MARKER_PREFIX = "UPSTREAM-CONTENT-"
INJECTED_RECEIPT = "eyJzdWNjZXNzIjp0cnVlLCJ0cmFuc2FjdGlvbiI6IjB4aW5qZWN0ZWQifQ=="  # {"success":true,"transaction":"0xinjected"}


@dataclass
class UpstreamCall:
    seq: int
    tool: str
    method: str
    path: str
    query: str
    body: bytes
    headers: dict[str, str]
    request_id: str | None
    status: int = 0
    marker: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


Hook = Callable[[UpstreamCall], None]


class RecordingUpstream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[UpstreamCall] = []
        self.hooks: dict[str, Hook] = {}
        self.observer: Hook | None = None
        self.server = ThreadServer(self._app())

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> RecordingUpstream:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    # -- test API --------------------------------------------------------------------------------

    def on(self, tool: str, hook: Hook | None) -> None:
        if hook is None:
            self.hooks.pop(tool, None)
        else:
            self.hooks[tool] = hook

    def snapshot(self) -> list[UpstreamCall]:
        with self._lock:
            return list(self.calls)

    def count(self, tool: str | None = None, since: int = 0) -> int:
        return sum(1 for c in self.snapshot()[since:] if tool is None or c.tool == tool)

    # -- the server ------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            body = await request.body()
            rest = request.path_params["rest"]
            tool = rest.split("/", 1)[0]
            with self._lock:
                call = UpstreamCall(
                    seq=len(self.calls), tool=tool, method=request.method, path=request.url.path,
                    query=request.url.query, body=body, headers={k.lower(): v for k, v in request.headers.items()},
                    request_id=request.headers.get("x-request-id"),
                    marker=f"{MARKER_PREFIX}{uuid.uuid4().hex}",
                )
                self.calls.append(call)
            if self.observer is not None:
                await run_in_threadpool(self.observer, call)
            hook = self.hooks.get(tool)
            if hook is not None:
                await run_in_threadpool(hook, call)
            content: dict[str, Any] = {"tool": tool, "path": call.path, "query": call.query, "marker": call.marker}
            if tool.startswith("redirect"):
                call.status = 302
                return Response(
                    json.dumps(content), status_code=302, media_type="application/json",
                    headers={"Location": f"{self.url}/elsewhere/{call.marker}"},
                )
            if tool.startswith("flaky") and sum(1 for c in self.snapshot() if c.path == call.path) == 1:
                call.status = 503
                return JSONResponse(content, status_code=503)
            if tool.startswith("inject"):
                call.status = 200
                return JSONResponse(content, headers={
                    "PAYMENT-RESPONSE": INJECTED_RECEIPT, "X-PAYMENT-RESPONSE": INJECTED_RECEIPT,
                    "X402GW-Replay": "true", "X-Injected": "yes",
                })
            if request.method in ("POST", "PUT", "PATCH", "DELETE"):
                try:
                    content["received"] = json.loads(body) if body else None
                except ValueError:
                    content["received"] = body.decode("utf-8", "replace")
                call.status = 201
                return JSONResponse(content, status_code=201)
            call.status = 200
            return JSONResponse(content)

        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[Route("/u/{rest:path}", handle, methods=methods)])
