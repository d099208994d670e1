"""Webhook endpoints from the settings (``X402GW_WEBHOOKS``), secrets read from the environment
or a file, never from the settings text itself, never logged and never in an error::

    X402GW_WEBHOOKS='{"acme-legacy": [{"name": "erp", "url": "https://erp.example/x402gw",
                      "events": ["payment.settled", "refund.owed"], "secret_env": "ACME_WEBHOOK_SECRET"}]}'

Per owner (the catalog's ``owner``), a list of endpoints: ``name`` (unique per gateway, letters,
digits, ``-``/``_``), ``url`` (http or https), ``events`` (default: every event,
``settlement.ledger.EVENTS``), and exactly one of ``secret_env`` / ``secret_file``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import GatewayConfigError
from settlement.chain.rpc import redact_url
from settlement.ledger import EVENTS

__all__ = ["Endpoint", "endpoints_from_settings", "subscriptions_of"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Endpoint:
    name: str
    owner: str
    url: str
    events: frozenset[str]
    secret: bytes = field(repr=False)  # never in a repr, a log or an error

    def describe(self) -> dict[str, Any]:
        """What the admin API shows: everything but the secret, and the URL as scheme://host[:port]
        only: the credentials it may carry (user:password@, query, and the path, where Slack,
        Discord, Teams and Zapier hooks keep theirs) stay out."""
        return {"name": self.name, "owner": self.owner, "url": redact_url(self.url), "events": sorted(self.events)}


def _secret(owner: str, name: str, spec: Mapping[str, Any], environ: Mapping[str, str]) -> bytes:
    env, path = spec.get("secret_env"), spec.get("secret_file")
    where = f"webhook {owner}/{name}"
    if (env is None) == (path is None):
        raise GatewayConfigError(f"{where}: give exactly one of secret_env and secret_file", code="webhook_invalid")
    if env is not None:
        value = environ.get(str(env), "")
        if not value:
            raise GatewayConfigError(f"{where}: the environment variable {env} is not set", code="webhook_secret_missing")
        return value.encode()
    try:
        value = Path(str(path)).read_text().strip()
    except OSError as exc:
        raise GatewayConfigError(f"{where}: cannot read {path}: {exc.strerror or type(exc).__name__}",
                                 code="webhook_secret_missing") from None
    if not value:
        raise GatewayConfigError(f"{where}: {path} is empty", code="webhook_secret_missing")
    return value.encode()


def _endpoint(owner: str, spec: Any, environ: Mapping[str, str] | None) -> Endpoint:
    if not isinstance(spec, Mapping):
        raise GatewayConfigError(f"webhooks of {owner}: each endpoint is an object", code="webhook_invalid")
    name, url = str(spec.get("name", "")), str(spec.get("url", ""))
    if not _NAME.match(name):
        raise GatewayConfigError(f"webhooks of {owner}: name {name!r} must be 1-64 letters, digits, - or _",
                                 code="webhook_invalid")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayConfigError(f"webhook {owner}/{name}: url must be http(s)://host/...", code="webhook_invalid")
    events = spec.get("events", list(EVENTS))
    unknown = sorted(set(events) - set(EVENTS)) if isinstance(events, list) else ["(not a list)"]
    if unknown:
        raise GatewayConfigError(f"webhook {owner}/{name}: unknown events {unknown}; known: {', '.join(EVENTS)}",
                                 code="webhook_invalid")
    secret = b"" if environ is None else _secret(owner, name, spec, environ)
    return Endpoint(name, owner, url, frozenset(events), secret)


def endpoints_from_settings(config: Mapping[str, Sequence[Any]], environ: Mapping[str, str] | None = None,
                            *, secrets: bool = True) -> dict[str, Endpoint]:
    """name → endpoint, every secret read now (a missing one stops the start-up, naming the variable).
    ``secrets=False``: names and events only (a command that writes events but sends none)."""
    environ = (os.environ if environ is None else environ) if secrets else None
    found: dict[str, Endpoint] = {}
    for owner, specs in config.items():
        for spec in specs:
            endpoint = _endpoint(owner, spec, environ)
            if endpoint.name in found:
                raise GatewayConfigError(f"webhook name {endpoint.name!r} is used twice", code="webhook_invalid")
            found[endpoint.name] = endpoint
    return found


def subscriptions_of(endpoints: Mapping[str, Endpoint]) -> Any:
    """The ledger's ``Subscriptions``: (owner, event type) → endpoint names."""
    table: dict[tuple[str, str], list[str]] = {}
    for endpoint in endpoints.values():
        for event in endpoint.events:
            table.setdefault((endpoint.owner, event), []).append(endpoint.name)

    def subscriptions(owner: str, event_type: str) -> list[str]:
        return table.get((owner, event_type), [])

    return subscriptions
