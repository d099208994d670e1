"""Credentials for remote facilitators: headers added to every request, fresh per request.

Two kinds, one seam (``FacilitatorAuth.headers(method, url)``):

* ``StaticHeaders``: fixed headers (``Authorization: Bearer ...``, ``X-Api-Key: ...``) read from the
  environment or a secret file by the gateway's settings.
* ``CdpJwtAuth``: the Coinbase Developer Platform scheme, a short-lived JWT signed per request from
  an API key id and secret (``CDP_API_KEY_ID`` / ``CDP_API_KEY_SECRET``). Implemented from CDP's
  public authentication docs: header ``{alg, kid: key id, typ: "JWT", nonce: random}``, claims
  ``{sub: key id, iss: "cdp", iat = nbf = now, exp = now + 120, uris: ["POST host/path"]}``, sent as
  ``Authorization: Bearer <jwt>``. The secret is either a PEM EC P-256 private key (ES256) or the
  base64 of 64 bytes, an Ed25519 seed followed by its public key (EdDSA).

Secrets never appear in a ``repr``, a log line or an exception message: errors name what is wrong
with a key (its format), never its value.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from settlement.chain.rpc import redact_url

__all__ = [
    "CDP_JWT_LIFETIME_SECONDS",
    "CdpJwtAuth",
    "FacilitatorAuth",
    "FacilitatorAuthError",
    "StaticHeaders",
    "redact_url",
]

CDP_JWT_LIFETIME_SECONDS = 120
CDP_ISSUER = "cdp"


class FacilitatorAuthError(ValueError):
    """A credential that cannot be used (wrong format). The message never contains the secret."""


class FacilitatorAuth(Protocol):
    """Headers to add to one request to a facilitator (``method`` ``url``), made per request."""

    def headers(self, method: str, url: str) -> dict[str, str]: ...


class StaticHeaders:
    """The same headers on every request (a bearer token, an API key header)."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str) or not name or "\n" in name + value or "\r" in name + value:
                raise FacilitatorAuthError("facilitator headers must be non-empty names with single-line string values")
        self._headers = dict(headers)

    def headers(self, method: str, url: str) -> dict[str, str]:
        return dict(self._headers)

    def __repr__(self) -> str:
        return f"StaticHeaders({sorted(self._headers)!r})"  # names only


SigningKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey


def load_cdp_secret(secret: str) -> tuple[SigningKey, str]:
    """The signing key and JWT algorithm of a CDP API key secret (PEM EC P-256, or base64 Ed25519
    seed‖public key)."""
    text = secret.strip().replace("\\n", "\n")
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise FacilitatorAuthError("the CDP API key secret is a PEM block but not an unencrypted private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise FacilitatorAuthError("the CDP API key secret's PEM key is not an EC P-256 key (ES256)")
        return key, "ES256"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FacilitatorAuthError("the CDP API key secret is neither a PEM EC key nor base64") from None
    if len(raw) != 64:
        raise FacilitatorAuthError(f"a base64 Ed25519 CDP API key secret must decode to 64 bytes (seed and public key), not {len(raw)}")
    ed_key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if public != raw[32:]:
        raise FacilitatorAuthError("the CDP API key secret's public half does not match its seed")
    return ed_key, "EdDSA"


class CdpJwtAuth:
    """``Authorization: Bearer <jwt>``, a fresh JWT per request, bound to its method, host and path."""

    def __init__(
        self,
        key_id: str,
        secret: str,
        *,
        lifetime: int = CDP_JWT_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key_id.strip():
            raise FacilitatorAuthError("the CDP API key id is empty")
        self.key_id = key_id.strip()
        self._key, self.algorithm = load_cdp_secret(secret)
        self._lifetime = lifetime
        self._clock = clock

    def token(self, method: str, url: str) -> str:
        parts = urlsplit(url)
        uri = f"{method.upper()} {parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
        now = int(self._clock())
        claims = {"sub": self.key_id, "iss": CDP_ISSUER, "iat": now, "nbf": now, "exp": now + self._lifetime, "uris": [uri]}
        headers = {"kid": self.key_id, "typ": "JWT", "nonce": secrets.token_hex(16)}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def headers(self, method: str, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(method, url)}"}

    def __repr__(self) -> str:
        return f"CdpJwtAuth(key_id={self.key_id!r}, algorithm={self.algorithm!r})"
