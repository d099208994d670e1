"""Case B: the fastest plain pass-through proxy in a few lines, the floor any Python gateway pays.

Starlette + one shared aiohttp ClientSession; run with uvicorn, uvloop + httptools, one worker:

    BENCH_UPSTREAM=http://127.0.0.1:9101 uvicorn bench.passthrough_proxy:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9101")
HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"})
session: aiohttp.ClientSession | None = None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=True)
    yield
    await session.close()


async def proxy(request: Request) -> Response:
    assert session is not None
    url = f"{UPSTREAM}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
    body = await request.body()
    async with session.request(request.method, url, data=body or None, allow_redirects=False) as upstream:
        content = await upstream.read()
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        return Response(content, status_code=upstream.status, headers=headers)


app = Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST"])], lifespan=lifespan)
