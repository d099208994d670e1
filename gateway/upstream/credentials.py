"""Upstream credentials: read once at start-up from the environment variables or files the catalog
names, kept out of every log, error body and record.

A missing variable or file stops the gateway with a message naming the variable or file, never
a value. ``Credentials.redact`` removes every secret (and its Basic-auth encoding) from text the
gateway is about to show: an upstream that echoes the key in its error does not leak it.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from catalog.bridge import BasicAuth, BearerAuth, HeaderAuth
from gateway.errors import GatewayConfigError
from gateway.headers import AUTHORIZATION

__all__ = ["Credentials", "CredentialsError", "resolve_credentials"]

REDACTED = "[redacted]"


class CredentialsError(GatewayConfigError):
    """An upstream credential (environment variable, secret file) is missing: the gateway does not start."""

    def __init__(self, message: str, code: str = "upstream_secret_missing") -> None:
        super().__init__(message, code)


@dataclass(frozen=True)
class Credentials:
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:  # a stray log of this object shows header names only
        return f"Credentials(headers={sorted(self.headers)})"

    @cached_property
    def forms(self) -> tuple[str, ...]:
        """Every secret as written, and as a JSON encoder writes it inside a string (``\\/`` for
        ``/`` too, as PHP's does): an upstream echoing the key in its JSON does not leak it."""
        found: dict[str, None] = {}
        for secret in self.secrets:
            escaped = json.dumps(secret)[1:-1]
            found.update(dict.fromkeys((secret, escaped, escaped.replace("/", "\\/"))))
        return tuple(sorted(found, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.forms:
            text = text.replace(secret, REDACTED)
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        for secret in self.forms:
            data = data.replace(secret.encode(), REDACTED.encode())
        return data

    def redact_headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Header values with every secret redacted: an upstream echoing its key in a header of
        its answer (a debug header, ``WWW-Authenticate``) does not hand it to the agent."""
        return [(name, self.redact(value)) for name, value in headers] if self.secrets else headers


def _read(kind: str, name: str, environ: Mapping[str, str], where: str) -> str:
    if kind == "env":
        value = environ.get(name)
        if not value:
            raise CredentialsError(f"{where}: environment variable {name} is not set (it holds the upstream credential)")
        return value
    try:
        value = Path(name).read_text(encoding="utf-8").strip()
    except OSError:
        raise CredentialsError(f"{where}: secret file {name} cannot be read") from None
    if not value:
        raise CredentialsError(f"{where}: secret file {name} is empty")
    return value


def _one(auth: object, prefix: str, environ: Mapping[str, str], where: str) -> str:
    env, file = getattr(auth, f"{prefix}_env", None), getattr(auth, f"{prefix}_file", None)
    return _read("env", env, environ, where) if env is not None else _read("file", str(file), environ, where)


def resolve_credentials(
    auth: HeaderAuth | BearerAuth | BasicAuth | None, where: str, environ: Mapping[str, str] | None = None
) -> Credentials:
    """``where`` names the upstream in messages, e.g. ``"demo.yaml: upstream warehouse"``."""
    env = os.environ if environ is None else environ
    if auth is None:
        return Credentials()
    if isinstance(auth, HeaderAuth):
        value = _one(auth, "value", env, where)
        return Credentials({auth.name: auth.prefix + value}, (value,))
    if isinstance(auth, BearerAuth):
        token = _one(auth, "token", env, where)
        return Credentials({AUTHORIZATION: f"Bearer {token}"}, (token,))
    username = auth.username if auth.username is not None else _one(auth, "username", env, where)
    password = _one(auth, "password", env, where)
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    return Credentials({AUTHORIZATION: f"Basic {encoded}"}, (password, encoded))
