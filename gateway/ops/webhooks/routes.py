"""Deliveries in the admin API (bearer ``X402GW_ADMIN_TOKEN``, as ``/admin``):

    GET  /admin/webhooks?status=pending|delivered|dead&limit=N   the latest deliveries, newest first
    POST /admin/webhooks/{id}/replay                              deliver that row again (same event id)

No secret is ever in an answer: endpoints are described by name, owner, URL and events.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy.engine import RowMapping
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import settlement.ledger.outbox as outbox
from gateway.errors import GatewayError
from gateway.ops.admin.routes import AdminAuth
from gateway.ops.webhooks.config import Endpoint
from settlement.ledger import Ledger, utcnow
from settlement.x402.digits import is_digits

__all__ = ["delivery_json", "webhook_routes"]

STATUSES = ("pending", "delivered", "dead")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def delivery_json(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"], "eventId": row["event_id"], "type": row["event_type"], "endpoint": row["endpoint"],
        "owner": row["owner"], "status": row["status"], "attempts": row["attempts"],
        "createdAt": _iso(row["created_at"]), "nextAttemptAt": _iso(row["next_attempt_at"]),
        "deliveredAt": _iso(row["delivered_at"]), "lastStatus": row["last_status"], "lastError": row["last_error"],
    }


def webhook_routes(ledger: Ledger, endpoints: dict[str, Endpoint], token: SecretStr | None,
                   wake: Callable[[], None]) -> list[Route]:
    auth = AdminAuth(token) if token is not None and token.get_secret_value() else None

    def gate(request: Request) -> Response | None:
        if auth is None:
            return GatewayError("not_found", "no tool is exposed at this path").to_response()
        if auth.decide(request) != "ok":
            return GatewayError("admin_unauthorized", "the admin token is missing or wrong", status=401).to_response()
        return None

    def _list(status: str | None, limit: int) -> list[dict[str, Any]]:
        with ledger.outbox_transaction() as connection:
            return [delivery_json(r) for r in outbox.list_rows(connection, status=status, limit=limit)]

    def _replay(row_id: int) -> bool:
        with ledger.outbox_transaction() as connection:
            return outbox.replay(connection, row_id, utcnow())

    async def listing(request: Request) -> Response:
        if (stop := gate(request)) is not None:
            return stop
        status = request.query_params.get("status")
        limit = request.query_params.get("limit", "100")
        if status is not None and status not in STATUSES or not is_digits(limit, 12) or not 1 <= int(limit) <= 1000:
            return GatewayError("invalid_arguments", f"status is one of {', '.join(STATUSES)}; limit 1-1000",
                                status=422).to_response()
        rows = await ledger.run(_list, status, int(limit))
        return JSONResponse({"endpoints": [e.describe() for e in endpoints.values()], "deliveries": rows})

    async def replay(request: Request) -> Response:
        if (stop := gate(request)) is not None:
            return stop
        raw = request.path_params["id"]
        if not is_digits(raw, 18) or not await ledger.run(_replay, int(raw)):
            return GatewayError("not_found", "no webhook delivery has this id").to_response()
        wake()
        return JSONResponse({"replayed": int(raw)})

    return [Route("/admin/webhooks", listing, methods=["GET"]),
            Route("/admin/webhooks/{id}/replay", replay, methods=["POST"])]
