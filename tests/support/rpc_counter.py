"""A loopback HTTP proxy in front of anvil that counts the JSON-RPC calls going through it: point a
gateway's deployment file at it to measure what a request costs in RPC (junk must cost none)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.devkit.devchain import Deployment
from gateway.ops.serving import ThreadServer


class RpcCounter:
    def __init__(self, target_url: str) -> None:
        self.target_url = target_url
        self._lock = threading.Lock()
        self.methods: Counter[str] = Counter()
        self._client = httpx.Client(timeout=60)
        self.server = ThreadServer(self._app())

    def start(self) -> RpcCounter:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self._client.close()

    @property
    def url(self) -> str:
        return self.server.url

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.methods)

    def since(self, before: Counter[str]) -> Counter[str]:
        now = self.snapshot()
        now.subtract(before)
        return +now  # drop zeros

    def deployment_file(self, deployment: Deployment, directory: Path) -> Path:
        """A copy of ``deployment`` whose RPC URL is this proxy."""
        path = directory / "devchain-counted.json"
        deployment.model_copy(update={"rpc_url": self.url}).write(path)
        return path

    def _app(self) -> Starlette:
        def forward(body: bytes, content_type: str) -> httpx.Response:
            return self._client.post(self.target_url, content=body, headers={"Content-Type": content_type})

        async def proxy(request: Request) -> Response:
            body = await request.body()
            try:
                data = json.loads(body)
                calls = data if isinstance(data, list) else [data]
                with self._lock:
                    for call in calls:
                        if isinstance(call, dict):
                            self.methods[str(call.get("method"))] += 1
            except ValueError:
                with self._lock:
                    self.methods["<unparsed>"] += 1
            answer = await run_in_threadpool(forward, body, request.headers.get("content-type", "application/json"))
            return Response(answer.content, status_code=answer.status_code,
                            media_type=answer.headers.get("content-type", "application/json"))

        return Starlette(routes=[Route("/", proxy, methods=["POST"])])
