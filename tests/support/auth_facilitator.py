"""A facilitator that demands credentials: ASGI middleware in front of any facilitator app (the
double, or our facilitator API over the test anvil), as a real server on loopback.

``RequireAuth(app, check)`` answers 401 (without calling ``app``) unless ``check`` accepts the
request's ``Authorization`` header; ``bearer(token)`` and ``cdp_jwt(key_id, public_key)`` are
the two checks. ``seen`` records each request's path and whether it was let through.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

# (method, host[:port], path, Authorization header or None) -> None if accepted, else why not.
Check = Callable[[str, str, str, str | None], str | None]


def bearer(token: str) -> Check:
    def check(method: str, host: str, path: str, authorization: str | None) -> str | None:
        return None if authorization == f"Bearer {token}" else "bad bearer token"

    return check


def cdp_jwt(key_id: str, public_key: Any, algorithm: str = "ES256") -> Check:
    """What CDP checks, as far as its docs say: signature, kid, sub, iss, times, and that the
    token names this very request (``uris``)."""

    def check(method: str, host: str, path: str, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return "no bearer token"
        token = authorization.removeprefix("Bearer ")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, public_key, algorithms=[algorithm], issuer="cdp",
                                options={"require": ["exp", "nbf", "iat", "sub", "iss"]})
        except jwt.PyJWTError as exc:
            return f"invalid jwt: {type(exc).__name__}"
        if header.get("kid") != key_id or claims.get("sub") != key_id or not header.get("nonce"):
            return "wrong key id or no nonce"
        if claims["exp"] - claims["iat"] > 120 or claims["iat"] > time.time() + 5:
            return "lifetime"
        if claims.get("uris") != [f"{method} {host}{path}"]:
            return f"token is for {claims.get('uris')}"
        return None

    return check


class RequireAuth:
    def __init__(self, app: ASGIApp, check: Check) -> None:
        self.app = app
        self.check = check
        self.seen: list[tuple[str, bool]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.check(scope["method"], headers.get("host", ""), scope["path"], headers.get("authorization"))
        self.seen.append((scope["path"], refusal is None))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "unauthorized", "message": refusal}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
