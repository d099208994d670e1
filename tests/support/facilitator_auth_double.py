"""A facilitator double that demands credentials, as production facilitators do: a real Starlette
app on a loopback port of its own. ``bearer`` mode wants ``Authorization: Bearer <token>``;
``jwt`` mode wants a bearer JWT signed (ES256) by the key whose public half it was given, naming
this very request in its ``uris`` claim (``["GET 127.0.0.1:PORT/supported"]``, as CDP's JWTs do)
and not expired. No credentials: 401; wrong ones: 403. With them, ``/supported`` lists ``kinds`` and
``/verify`` answers an empty body with a 400, as a facilitator that accepted the caller does.
"""

from __future__ import annotations

from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer


class AuthFacilitatorDouble:
    def __init__(self, kinds: list[dict[str, Any]], *, bearer: str | None = None, jwt_key: EllipticCurvePublicKey | None = None) -> None:
        assert (bearer is None) != (jwt_key is None), "one way of authenticating"
        self.kinds = kinds
        self.bearer = bearer
        self.jwt_key = jwt_key
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self._server = ThreadServer(Starlette(routes=[
            Route("/supported", self._supported, methods=["GET"]),
            Route("/verify", self._verify, methods=["POST"]),
        ]))

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> AuthFacilitatorDouble:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def _refusal(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        self.seen.append((request.method, request.url.path, header))
        if not header or not header.startswith("Bearer "):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        token = header.removeprefix("Bearer ")
        if self.bearer is not None:
            return None if token == self.bearer else JSONResponse({"error": "forbidden"}, status_code=403)
        try:
            claims = jwt.decode(token, self.jwt_key, algorithms=["ES256"], options={"require": ["exp", "uris"]})
        except jwt.PyJWTError:
            return JSONResponse({"error": "forbidden"}, status_code=403)
        wanted = f"{request.method} {request.url.hostname}:{request.url.port}{request.url.path}"
        return None if wanted in claims["uris"] else JSONResponse({"error": "forbidden"}, status_code=403)

    async def _supported(self, request: Request) -> Response:
        refusal = self._refusal(request)
        return refusal or JSONResponse({"kinds": self.kinds, "extensions": [], "signers": {}})

    async def _verify(self, request: Request) -> Response:
        refusal = self._refusal(request)
        return refusal or JSONResponse({"isValid": False, "invalidReason": "invalid_payload"}, status_code=400)
