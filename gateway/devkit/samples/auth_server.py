"""A small OAuth 2.0 authorization server for demos and tests of user-scoped tools.

It signs RS256 JWT access tokens with one RSA key made at start (``kid`` published), and serves:

    GET  /jwks                  the public key (JWKS)
    POST /token                 grant_type=client_credentials (client_id/secret, HTTP Basic or form):
                                a token whose subject is the client; ``audience`` and ``scope`` asked
                                grant_type=urn:ietf:params:oauth:grant-type:token-exchange (RFC 8693):
                                the subject_token (one of ours, unexpired) traded for a token with the
                                same subject and scopes for the requested ``audience``; ``act`` names
                                the client that asked
    GET  /stats                 how many tokens of each grant were issued

``AuthServer.issue`` mints a user's token directly (what a login would give), for tests.

    python -m gateway.devkit.samples.auth_server --port 9103
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import time
from collections import Counter
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["DEMO_CLIENTS", "AuthServer", "main"]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
DEMO_CLIENTS = {"x402gw": "demo-exchange-secret-51f0", "agent-cli": "demo-agent-secret-77aa"}


def _error(code: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status_code=status)


class AuthServer:
    def __init__(self, issuer: str, clients: dict[str, str] | None = None, lifetime: int = 600) -> None:
        self.issuer = issuer  # set before tokens are issued; tests set it to the server's URL
        self.clients = dict(DEMO_CLIENTS if clients is None else clients)
        self.lifetime = lifetime
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.issued: Counter[str] = Counter()
        self.tokens: list[str] = []  # every token issued: tests look for them where none may be

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def issue(self, subject: str, audience: str, scope: str = "", *, expires_in: int | None = None,
              extra: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now,
                  "exp": now + (self.lifetime if expires_in is None else expires_in),
                  "jti": secrets.token_hex(8), **({"scope": scope} if scope else {}), **(extra or {})}
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        self.tokens.append(token)
        return token

    def _client(self, request: Request, form: Any) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return None
        else:
            client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        known = self.clients.get(client_id)
        return client_id if known is not None and secrets.compare_digest(known, secret) else None

    async def token(self, request: Request) -> Response:
        form = await request.form()
        client = self._client(request, form)
        if client is None:
            return _error("invalid_client", "unknown client or wrong secret", 401)
        grant = form.get("grant_type")
        audience = str(form.get("audience", ""))
        if not audience:
            return _error("invalid_target", "audience is required")
        if grant == "client_credentials":
            self.issued["client_credentials"] += 1
            return self._answer(self.issue(client, audience, str(form.get("scope", ""))))
        if grant != TOKEN_EXCHANGE:
            return _error("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        if form.get("subject_token_type") != ACCESS_TOKEN:
            return _error("invalid_request", "subject_token_type must be an access token")
        try:
            subject = jwt.decode(str(form.get("subject_token", "")), self.key.public_key(), algorithms=["RS256"],
                                 issuer=self.issuer, options={"verify_aud": False, "require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return _error("invalid_grant", "the subject token is not valid")
        self.issued["token_exchange"] += 1
        token = self.issue(subject["sub"], audience, str(subject.get("scope", "")), extra={"act": {"sub": client}})
        return self._answer(token, issued_token_type=ACCESS_TOKEN)

    def _answer(self, token: str, **extra: str) -> JSONResponse:
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime, **extra},
                            headers={"Cache-Control": "no-store"})

    async def jwks_endpoint(self, request: Request) -> Response:
        self.issued["jwks"] += 1
        return JSONResponse(self.jwks())

    async def stats(self, request: Request) -> Response:
        return JSONResponse(dict(self.issued))

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/jwks", self.jwks_endpoint, methods=["GET"]),
            Route("/token", self.token, methods=["POST"]),
            Route("/stats", self.stats, methods=["GET"]),
        ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample OAuth 2.0 authorization server for x402gw demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9103)
    args = parser.parse_args(argv)
    server = AuthServer(f"http://{args.host}:{args.port}")
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
