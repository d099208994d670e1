"""Refusals the gateway answers with, and the one table that maps them to HTTP.

Every refusal has a stable ``code`` (snake_case), a human ``message``, and optional machine-readable
fields telling the agent what to do next (``retryAfter``, ``transaction``, ``paymentId``...).
Bodies never carry ``str(exc)`` of an internal error or a stack trace.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

# code → HTTP status. Codes not listed default to their class's status.
STATUS_BY_CODE: dict[str, int] = {
    "not_found": 404,
    "method_not_allowed": 405,
    "invalid_arguments": 422,
    "request_too_large": 413,
    "invalid_json_body": 400,
    "payment_in_flight": 409,
    "payment_already_settled": 409,
    "upstream_timeout": 504,
    "upstream_unavailable": 502,
    "upstream_response_too_large": 502,
    "settlement_pending": 503,
    "settlement_unavailable": 503,
    "facilitator_unavailable": 503,
    "ledger_unavailable": 503,
    "store_unavailable": 503,
    "internal_error": 500,
}


class GatewayError(Exception):
    status = 400

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_BY_CODE.get(code, type(self).status)
        self.headers = headers or {}
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.fields}

    def to_response(self) -> Response:
        headers = {"Cache-Control": "no-store", **self.headers}
        retry_after = self.fields.get("retryAfter")
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after))
        return Response(
            json.dumps(self.body(), separators=(",", ":")),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )
