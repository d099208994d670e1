"""Per-user orders for the sample REST upstream: each user sees only their own, enforced here, by
the upstream itself, from the bearer token it receives (signature from the issuer's JWKS, issuer,
audience, expiry), whatever the caller in front of it decided.

    GET /users/{user}/orders    200 the user's orders; 401 no or bad token; 403 another user's
    GET /users/seen             what the accepted tokens said (subject, audience, actor, scope;
                                never the token), so tests can see what the gateway sent
"""

from __future__ import annotations

from typing import Any

import jwt
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["SAMPLE_ORDERS", "UserOrders"]

SAMPLE_ORDERS: dict[str, list[dict[str, Any]]] = {
    "alice": [{"id": "A-1001", "item": "hex bolts", "quantity": 200, "total": "70.00"},
              {"id": "A-1002", "item": "washers", "quantity": 500, "total": "12.50"}],
    "bob": [{"id": "B-2001", "item": "wood screws", "quantity": 1000, "total": "41.00"}],
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class UserOrders:
    def __init__(self, issuer: str, audience: str, jwks_url: str) -> None:
        self.issuer, self.audience = issuer, audience
        self.keys = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300)
        self.seen: list[dict[str, Any]] = []

    def _claims(self, token: str) -> dict[str, Any]:
        key = self.keys.get_signing_key_from_jwt(token)
        return jwt.decode(token, key.key, algorithms=["RS256"], audience=self.audience, issuer=self.issuer,
                          options={"require": ["exp", "sub", "aud"]})

    async def orders(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return _error(401, "no_token", "a bearer token is required")
        try:
            claims = await run_in_threadpool(self._claims, header[7:].strip())
        except jwt.PyJWTError:
            return _error(401, "bad_token", "the bearer token is not valid for this API")
        self.seen.append({"sub": claims["sub"], "aud": claims["aud"], "act": claims.get("act"),
                          "scope": claims.get("scope")})
        user = request.path_params["user"]
        if claims["sub"] != user:
            return _error(403, "not_your_orders", "these orders belong to another user")
        return JSONResponse({"user": user, "orders": SAMPLE_ORDERS.get(user, [])})

    async def seen_tokens(self, request: Request) -> Response:
        return JSONResponse({"seen": self.seen})

    def routes(self) -> list[Route]:
        return [
            Route("/users/seen", self.seen_tokens, methods=["GET"]),
            Route("/users/{user}/orders", self.orders, methods=["GET"]),
        ]
