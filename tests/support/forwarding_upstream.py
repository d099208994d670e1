"""An upstream on loopback that records exactly what reached it, and lies on request.

Every request is kept as it arrived on the wire (method, path, query, raw header pairs, body
bytes) so a test can assert what the gateway forwarded, byte for byte. A few routes misbehave the
way a malicious upstream would:

- ``/rec/...``: any method; answers ``{"ok": true}`` (a first-key-wins reader's view of the body in
  ``firstKeyWins``, to show what such an upstream would have acted on);
- ``/redirect``: a 302 with a Location and the "paid" content in its body;
- ``/spoof`` and ``/spoof-error``: a 200 (a 500) carrying a forged receipt, offer, gateway headers
  and a cookie;
- ``/soap``: a SOAP 1.1 answer with a ``<Result>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET_CONTENT = b'{"secret":"the paid content, leaked through a redirect"}'
FORGED_HEADERS = {
    "PAYMENT-RESPONSE": "eyJmb3JnZWQiOnRydWV9",
    "X-PAYMENT-RESPONSE": "eyJmb3JnZWQiOnRydWV9",
    "PAYMENT-REQUIRED": "eyJmb3JnZWQiOnRydWV9",
    "X402GW-Replay": "true",
    "X402GW-Refund": "refunded 0xforged",
    "Set-Cookie": "session=forged; Path=/",
    "X-Upstream-Note": "kept",
}
SOAP_ANSWER = (
    b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
    b'<soap:Body><m:EchoResponse xmlns:m="urn:test"><m:Result><m:value>ok</m:value></m:Result>'
    b"</m:EchoResponse></soap:Body></soap:Envelope>"
)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None


def _first_key_wins(body: bytes) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            document.setdefault(key, value)
        return document

    try:
        return json.loads(body, object_pairs_hook=hook)
    except ValueError:
        return None


def create_app(received: list[Received]) -> Starlette:
    async def record(request: Request) -> Received:
        entry = Received(
            request.method, request.url.path, request.url.query,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
            await request.body(),
        )
        received.append(entry)
        return entry

    async def rec(request: Request) -> Response:
        entry = await record(request)
        return JSONResponse({"ok": True, "firstKeyWins": _first_key_wins(entry.body)})

    async def redirect(request: Request) -> Response:
        await record(request)
        return Response(SECRET_CONTENT, status_code=302, media_type="application/json",
                        headers={"Location": "http://127.0.0.1:1/elsewhere"})

    async def spoof(request: Request) -> Response:
        await record(request)
        return JSONResponse({"ok": True}, headers=FORGED_HEADERS)

    async def spoof_error(request: Request) -> Response:
        await record(request)
        return JSONResponse({"error": "broken"}, status_code=500, headers=FORGED_HEADERS)

    async def soap(request: Request) -> Response:
        await record(request)
        return Response(SOAP_ANSWER, media_type="text/xml")

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[
        Route("/rec/{rest:path}", rec, methods=methods),
        Route("/redirect", redirect, methods=methods),
        Route("/spoof", spoof, methods=methods),
        Route("/spoof-error", spoof_error, methods=methods),
        Route("/soap", soap, methods=["POST"]),
    ])
