"""Webhooks: events of each owner's payments (settled, failed, pending; refund owed, paid) and of the
gateway (breaker opened, budget exhausted), delivered at least once to the owner's endpoints.

    config.py      the endpoints, from ``X402GW_WEBHOOKS`` (secrets from the environment or a file)
    signing.py     ``X402GW-Signature: t=...,v1=...`` (HMAC-SHA256 over "t.body"), and ``verify``
    dispatcher.py  the background task delivering the outbox's rows under a lease, with backoff
    routes.py      ``GET /admin/webhooks``, ``POST /admin/webhooks/{id}/replay``

The events themselves are written by the ledger, in the transaction of the change they report
(``settlement.ledger.outbox``); ``Webhooks.emit`` writes the ones that change no payment.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

import settlement.ledger.outbox as outbox
from gateway.ops.webhooks.config import Endpoint, endpoints_from_settings, subscriptions_of
from gateway.ops.webhooks.dispatcher import Dispatcher, exponential_backoff
from gateway.ops.webhooks.routes import delivery_json, webhook_routes
from gateway.ops.webhooks.signing import SIGNATURE_HEADER, signature_header, verify
from gateway.settings import Settings
from settlement.ledger import Ledger

__all__ = [
    "SIGNATURE_HEADER",
    "Dispatcher",
    "Endpoint",
    "Webhooks",
    "delivery_json",
    "endpoints_from_settings",
    "exponential_backoff",
    "signature_header",
    "verify",
]

log = logging.getLogger("x402gw.webhooks")
Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


class Webhooks:
    """The gateway's webhooks: subscriptions set on the ledger, the dispatcher, the admin routes."""

    def __init__(self, ledger: Ledger, endpoints: dict[str, Endpoint], dispatcher: Dispatcher) -> None:
        self.ledger, self.endpoints, self.dispatcher = ledger, endpoints, dispatcher
        ledger.subscriptions = subscriptions_of(endpoints) if endpoints else None

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger) -> Webhooks:
        endpoints = endpoints_from_settings(settings.webhooks)
        dispatcher = Dispatcher(
            ledger, endpoints, lease=timedelta(seconds=settings.webhook_lease_seconds),
            max_attempts=settings.webhook_max_attempts, poll_seconds=settings.webhook_poll_seconds,
        )
        return cls(ledger, endpoints, dispatcher)

    def routes(self, settings: Settings) -> list[Route]:
        return webhook_routes(self.ledger, self.endpoints, settings.admin_token, self.dispatcher.wake)

    async def emit(self, owner: str, event_type: str, data: dict[str, Any]) -> None:
        """An event that changes no payment (breaker opened, budget exhausted), in its own
        transaction. Never raises: the request that noticed it goes on (the log has the failure)."""
        subscriptions = self.ledger.subscriptions
        if subscriptions is None:
            return

        def write() -> None:
            with self.ledger.outbox_transaction() as connection:
                outbox.emit(connection, subscriptions, owner, event_type, data)

        try:
            await self.ledger.run(write)
        except Exception:
            log.exception("webhook event %s of %s not written", event_type, owner)
            return
        self.dispatcher.wake()

    def watch(self, safety: Any) -> None:
        """breaker.opened from the breakers (upstream keys are owner/upstream), budget.exhausted
        from the budgets (``gateway.safety``)."""
        if not self.endpoints:
            return

        async def opened(upstream: str, until: float) -> None:
            owner, _, name = upstream.partition("/")
            await self.emit(owner, "breaker.opened", {"upstream": name, "openUntil": int(until)})

        safety.breakers.on_open = opened
        safety.on_event = self.emit

    def around(self, inner: Lifespan) -> Lifespan:
        """``inner``'s start-up, then the dispatcher (only with endpoints); stopped before ``inner``'s end."""

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with inner(app):
                if self.endpoints:
                    self.dispatcher.start()
                try:
                    yield
                finally:
                    await self.dispatcher.stop()

        return lifespan
