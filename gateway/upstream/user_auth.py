"""The end user's OAuth 2.0 access token: checked for a tool's ``user_auth`` (``catalog.user_auth``),
and turned into the credential the upstream receives.

``UserAuthority.verify`` checks a bearer JWT against the tool's issuer: the signature with the
issuer's JWKS (fetched over HTTP, cached ``jwks_ttl`` seconds; an unknown ``kid`` refetches at most
once per ``refetch_seconds``, so junk tokens cannot make the gateway hammer the issuer), issuer,
audience, expiry (``leeway_seconds`` of clock skew, default 30), and that every scope the tool
declares is granted. Only the algorithms the catalog allows (public-key ones: never ``none``, never
HS*, so a public key cannot be used as an HMAC secret) are accepted. Refusals are 401 (missing,
malformed, wrongly signed, expired, another issuer or audience) or 403 (``missingScopes``).

``UserAuthority.upstream_credentials`` gives the bridge what goes upstream instead of the service
credential: ``Authorization: Bearer`` with the user's token, or the token obtained by RFC 8693
token exchange for the upstream's audience. Tokens are never logged, stored or put in an error:
a ``UserToken`` shows its subject and a digest only, and the bridge redacts the token from
whatever the upstream answers.

Wallet-linked accounts (a tool's ``wallet_accounts``): the owner's secret file maps payer
addresses to upstream user credentials, read at start-up; ``for_call`` looks up the payer the
facilitator's verify confirmed (the bridge runs after ``verify``), never a claimed one. A payer
with no account: 403 ``wallet_not_linked`` from the ``linked_account`` stage, right after ``verify``
and before the payment is recorded or settled: nothing charged, upfront tools included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt

from catalog import Tool
from catalog.user_auth import TokenExchange, UserAuth, WalletAccounts
from gateway import codes
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import AUTHORIZATION, WWW_AUTHENTICATE
from gateway.upstream.credentials import Credentials

__all__ = ["JwksCache", "UserAuthority", "UserToken", "token_digest"]

log = logging.getLogger("x402gw.user_auth")

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
_MAX_TOKEN_CHARS = 8192


def token_digest(token: str) -> str:
    """What may be recorded of a token: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UserToken:
    """A checked user token: who (issuer and subject) and what it grants; the token itself is
    kept only for the upstream call and never shown (``repr`` names the subject and digest)."""

    issuer: str
    subject: str
    scopes: frozenset[str]
    token: str = field(repr=False)

    @property
    def digest(self) -> str:
        return token_digest(self.token)

    @property
    def principal(self) -> str:
        """Issuer and subject: what binds a payment's stored answer to this user."""
        return f"{self.issuer} {self.subject}"


def _refused(code: str, message: str, auth: UserAuth, **fields: Any) -> GatewayError:
    error = "insufficient_scope" if code == codes.USER_SCOPE_MISSING else "invalid_token"
    challenge = f'Bearer realm="x402gw", error="{error}"'
    if auth.scopes:
        challenge += f', scope="{" ".join(auth.scopes)}"'
    return GatewayError(code, message, headers={WWW_AUTHENTICATE: challenge}, **fields)


class JwksCache:
    """Each issuer's JWKS, fetched with ``fetch`` and kept ``ttl`` seconds; ``clock`` is a seam."""

    def __init__(
        self, fetch: Callable[[str], Any], *, ttl: float = 300.0, refetch_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch, self.ttl, self.refetch_seconds, self.clock = fetch, ttl, refetch_seconds, clock
        self._sets: dict[str, tuple[float, jwt.PyJWKSet]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0

    async def key(self, url: str, kid: str | None) -> jwt.PyJWK | None:
        now = self.clock()
        held = self._sets.get(url)
        if held is None or now - held[0] >= self.ttl:
            held = await self._refresh(url, held)
        found = _find(held[1], kid)
        if found is None and now - held[0] >= self.refetch_seconds:  # a rotated key, at most so often
            found = _find((await self._refresh(url, held))[1], kid)
        return found

    async def _refresh(self, url: str, seen: tuple[float, jwt.PyJWKSet] | None) -> tuple[float, jwt.PyJWKSet]:
        lock = self._locks.setdefault(url, asyncio.Lock())  # one key per catalog URL: bounded
        async with lock:
            held = self._sets.get(url)
            if held is not None and held is not seen:
                return held  # another request refreshed it meanwhile
            self.fetches += 1
            try:
                document = await self.fetch(url)
                keys = jwt.PyJWKSet.from_dict(document)
            except (httpx.HTTPError, jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                log.warning("JWKS %s unavailable: %s", url, type(exc).__name__)
                raise GatewayError(codes.USER_AUTH_UNAVAILABLE, "the token issuer's keys cannot be read; retry later",
                                   status=503, retryAfter=5) from None
            held = (self.clock(), keys)
            self._sets[url] = held
            return held


def _find(keys: jwt.PyJWKSet, kid: str | None) -> jwt.PyJWK | None:
    for key in keys.keys:
        if kid is None or key.key_id == kid:
            return key
    return None


def _scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    scope, scp = claims.get("scope"), claims.get("scp")
    granted: set[str] = set(scope.split()) if isinstance(scope, str) else set()
    if isinstance(scp, list):
        granted.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        granted.update(scp.split())
    return frozenset(granted)


async def _http_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()


class UserAuthority:
    """Every tool's ``user_auth``, prepared once: exchange client secrets read at start-up."""

    def __init__(
        self, tools: Iterable[Tool], *, environ: Mapping[str, str] | None = None, jwks: JwksCache | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.jwks = jwks or JwksCache(_http_json)
        self.transport = transport
        self._secrets: dict[str, str] = {}
        tools_list = list(tools)
        for tool in tools_list:
            exchange = tool.user_auth.exchange if tool.user_auth is not None else None
            if exchange is not None and exchange.client_secret_env not in self._secrets:
                secret = env.get(exchange.client_secret_env)
                if not secret:
                    raise GatewayConfigError(
                        f"tool {tool.name}: environment variable {exchange.client_secret_env} is not set "
                        "(the token exchange client secret)", code="user_auth_secret_missing",
                    )
                self._secrets[exchange.client_secret_env] = secret
        self._accounts = {
            tool.name: _read_accounts(tool.name, tool.wallet_accounts) for tool in tools_list if tool.wallet_accounts is not None
        }

    async def verify(self, auth: UserAuth, header: str | None) -> UserToken:
        if header is None or not header[:7].lower() == "bearer " or not header[7:].strip():
            raise _refused(codes.USER_TOKEN_MISSING, "this tool acts for its user: send Authorization: Bearer "
                           f"<an access token from {auth.issuer} for {auth.audience}>", auth, status=401)
        token = header[7:].strip()
        if len(token) > _MAX_TOKEN_CHARS:
            raise _refused(codes.USER_TOKEN_INVALID, "the access token is too long", auth, status=401)
        try:
            head = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused(codes.USER_TOKEN_INVALID, "the access token is not a JWT", auth, status=401) from None
        alg, kid = head.get("alg"), head.get("kid")
        if alg not in auth.algorithms:
            raise _refused(codes.USER_TOKEN_INVALID, f"the access token's algorithm is not one of "
                           f"{', '.join(auth.algorithms)}", auth, status=401)
        key = await self.jwks.key(auth.jwks_url, kid if isinstance(kid, str) else None)
        if key is None:
            raise _refused(codes.USER_TOKEN_INVALID, "the access token is signed by a key the issuer does not publish",
                           auth, status=401)
        claims = self._decode(token, key, str(alg), auth)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _refused(codes.USER_TOKEN_INVALID, "the access token names no subject", auth, status=401)
        granted = _scopes_of(claims)
        missing = [scope for scope in auth.scopes if scope not in granted]
        if missing:
            raise _refused(codes.USER_SCOPE_MISSING, f"the access token lacks scope(s) {' '.join(missing)}", auth,
                           status=403, missingScopes=missing)
        return UserToken(auth.issuer, subject, granted, token)

    @staticmethod
    def _decode(token: str, key: jwt.PyJWK, alg: str, auth: UserAuth) -> dict[str, Any]:
        try:
            return jwt.decode(
                token, key.key, algorithms=[alg], audience=auth.audience, issuer=auth.issuer,
                leeway=auth.leeway_seconds, options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            code, message = codes.USER_TOKEN_EXPIRED, "the access token has expired"
        except jwt.InvalidAudienceError:
            code, message = codes.USER_TOKEN_WRONG_AUDIENCE, f"the access token is not for audience {auth.audience}"
        except jwt.InvalidIssuerError:
            code, message = codes.USER_TOKEN_WRONG_ISSUER, f"the access token is not from issuer {auth.issuer}"
        except jwt.PyJWTError:
            code, message = codes.USER_TOKEN_INVALID, "the access token's signature or claims do not check out"
        raise _refused(code, message, auth, status=401)

    async def for_call(self, tool: Tool, user: UserToken | None, payer: str | None) -> Credentials | None:
        """The end user's credential for this call (None: the upstream's own). ``payer``: the one
        the facilitator verified."""
        if tool.user_auth is not None and user is not None:
            return await self.upstream_credentials(tool.user_auth, user)
        linked = tool.wallet_accounts
        if linked is None or tool.name not in self._accounts:
            return None
        secret = self.linked_account(tool, payer)
        return Credentials({linked.header: linked.prefix + secret}, (secret,))

    def linked_account(self, tool: Tool, payer: str | None) -> str:
        """The upstream credential linked to ``payer`` (one the facilitator verified) for a
        ``wallet_accounts`` tool; 403 ``wallet_not_linked`` when it has none."""
        accounts = self._accounts.get(tool.name, {})
        secret = accounts.get(payer.lower()) if payer else None
        if secret is None:
            raise GatewayError(codes.WALLET_NOT_LINKED, "this tool acts for the payer's own account, and this wallet "
                               "has none linked; nothing was charged", status=403, retryable=False)
        return secret

    async def upstream_credentials(self, auth: UserAuth, user: UserToken) -> Credentials:
        """What the upstream receives in place of the service credential."""
        token = user.token if auth.exchange is None else await self._exchange(auth.exchange, user)
        return Credentials({AUTHORIZATION: f"Bearer {token}"}, (token, user.token))

    async def _exchange(self, exchange: TokenExchange, user: UserToken) -> str:
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": user.token, "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE, "audience": exchange.audience,
        }
        secret = self._secrets[exchange.client_secret_env]
        try:
            async with httpx.AsyncClient(timeout=10.0, follow_redirects=False, transport=self.transport) as client:
                response = await client.post(exchange.token_url, data=form, auth=(exchange.client_id, secret))
            token = response.json().get("access_token") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError, RecursionError) as exc:
            log.warning("token exchange at %s failed: %s", exchange.token_url, type(exc).__name__)
            token = None
        else:
            if token is None:
                log.warning("token exchange at %s refused: HTTP %d", exchange.token_url, response.status_code)
        if not isinstance(token, str) or not token:
            raise GatewayError(codes.USER_TOKEN_EXCHANGE_FAILED, "the user's token could not be exchanged for the "
                               "upstream's; nothing was charged", status=502, retryable=True)
        return token


def _read_accounts(tool: str, accounts: WalletAccounts) -> dict[str, str]:
    """The owner's secret file: a JSON object of payer address -> credential (keys lower-cased)."""
    try:
        data = json.loads(Path(accounts.credentials_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GatewayConfigError(f"tool {tool}: wallet accounts file {accounts.credentials_file} cannot be read as JSON",
                                 code="wallet_accounts_unreadable") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and len(k) == 42 and k.startswith("0x") and isinstance(v, str) and v for k, v in data.items()
    ):
        raise GatewayConfigError(f"tool {tool}: wallet accounts file {accounts.credentials_file} must map 0x addresses "
                                 "to non-empty credentials", code="wallet_accounts_unreadable")
    return {address.lower(): secret for address, secret in data.items()}
