"""User-scoped access: a tool that acts for its end user, with the user's OAuth 2.0 access token.

Catalog syntax (a tool's ``user_auth:`` block; no block: the upstream gets the service credential)::

    user_auth:
      issuer: https://auth.example.com          # the token's iss, exactly
      audience: orders-api                      # the token's aud must contain it
      jwks_url: https://auth.example.com/jwks   # the issuer's signing keys (JWKS, cached with a TTL)
      scopes: [orders:read]                     # every one must be granted (scope / scp claims)
      algorithms: [RS256]                       # asymmetric only: none and HS* are refused at load
      leeway_seconds: 30                        # clock skew allowed on exp / nbf / iat (0..120)
      exchange:                                 # optional: RFC 8693 token exchange for the upstream
        token_url: https://auth.example.com/token
        audience: orders-upstream
        client_id: x402gw
        client_secret_env: ORDERS_EXCHANGE_SECRET   # read at start-up, never written here

Or wallet-linked accounts (a tool's ``wallet_accounts:`` block): the owner maps payer addresses to
upstream user credentials in a secret file (JSON: ``{"0xPayer...": "credential"}``), read at
start-up; the payer's credential is used only once the payment is verified (never before)::

    wallet_accounts:
      credentials_file: /run/secrets/orders-accounts.json
      header: Authorization      # default
      prefix: "Bearer "          # default

The token is checked before a price is quoted (``gateway.pipeline.stages.user_auth``); the token,
or the exchanged one, is what the upstream receives instead of the upstream's ``auth``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

__all__ = ["ALLOWED_ALGORITHMS", "MAX_LEEWAY_SECONDS", "TokenExchange", "UserAuth", "WalletAccounts", "user_auth_problems"]

# Signature algorithms a user token may use: public-key ones only, so a JWKS's public key can
# never be taken for an HMAC secret, and ``none`` is never accepted.
ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
MAX_LEEWAY_SECONDS = 120
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fail(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, "{detail}", {"detail": message})


def _url(what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s#]*", value):
            raise _fail("invalid_url", f"{what} must be an http(s) URL, got {value!r}")
        return value

    return check


def _text(what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or len(value) > 1024:
            raise _fail("invalid_value", f"{what} must be a non-empty string, got {value!r}")
        return value

    return check


def _scopes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and _SCOPE.fullmatch(s) for s in value):
        raise _fail("invalid_scope", f"scopes must be a list of OAuth scope names (no spaces or quotes), got {value!r}")
    return tuple(value)


def _algorithms(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail("invalid_algorithm", f"algorithms must be a non-empty list, got {value!r}")
    refused = [a for a in value if a not in ALLOWED_ALGORITHMS]
    if refused:
        raise _fail("invalid_algorithm", f"algorithm(s) {refused!r} refused: only public-key signatures "
                    f"({', '.join(sorted(ALLOWED_ALGORITHMS))}); never none or HS*")
    return tuple(value)


def _leeway(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LEEWAY_SECONDS:
        raise _fail("invalid_value", f"leeway_seconds must be an integer 0..{MAX_LEEWAY_SECONDS}, got {value!r}")
    return value


def _env(value: Any) -> str:
    if not isinstance(value, str) or not _ENV.fullmatch(value):
        raise _fail("invalid_value", f"client_secret_env must name an environment variable, got {value!r}")
    return value


class TokenExchange(BaseModel):
    """RFC 8693 token exchange: the user's token traded for one whose audience is the upstream's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_url: Annotated[str, BeforeValidator(_url("token_url"))]
    audience: Annotated[str, BeforeValidator(_text("exchange.audience"))]
    client_id: Annotated[str, BeforeValidator(_text("client_id"))]
    client_secret_env: Annotated[str, BeforeValidator(_env)]


class UserAuth(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: Annotated[str, BeforeValidator(_text("issuer"))]
    audience: Annotated[str, BeforeValidator(_text("audience"))]
    jwks_url: Annotated[str, BeforeValidator(_url("jwks_url"))]
    scopes: Annotated[tuple[str, ...], BeforeValidator(_scopes)] = ()
    algorithms: Annotated[tuple[str, ...], BeforeValidator(_algorithms)] = ("RS256", "ES256")
    leeway_seconds: Annotated[int, BeforeValidator(_leeway)] = 30
    exchange: TokenExchange | None = None


def _header(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
        raise _fail("invalid_value", f"header must be an HTTP header name, got {value!r}")
    return value


class WalletAccounts(BaseModel):
    """Payer addresses mapped to upstream user credentials (a secret file), after verify only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    credentials_file: Annotated[str, BeforeValidator(_text("credentials_file"))]
    header: Annotated[str, BeforeValidator(_header)] = "Authorization"
    prefix: str = "Bearer "


def user_auth_problems(user_auth: UserAuth | None, wallet_accounts: WalletAccounts | None) -> list[tuple[str, str, str]]:
    """Cross-field checks of a tool's user blocks, as ``(field, code, message)`` under the tool."""
    if user_auth is not None and wallet_accounts is not None:
        return [("wallet_accounts", "user_auth_conflict",
                 "a tool acts for its user one way: user_auth (the user's token) or wallet_accounts (the payer's linked "
                 "account), not both")]
    return []
