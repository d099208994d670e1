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
    "request_headers_too_large": 431,
    "payer_denied": 403,
    "budget_exceeded": 403,
    "rate_limited": 429,
    "tool_disabled": 503,
    "upstream_circuit_open": 503,
    "price_guard": 503,
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
        return {"error": self.code, "message": self.message, **self.fields, "next": self.next_step()}

    def next_step(self) -> dict[str, Any]:
        return next_step(self.code, self.status, self.fields)

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


# What an agent should do about a refusal, derived from its code, status and fields in this one
# place, so every refusal (HTTP body, MCP result) says it the same way:
#   pay             402: sign the offer in PAYMENT-REQUIRED (or structuredContent over MCP)
#   fix_arguments   the arguments or body are wrong: `fields` names them
#   fix_payment     the payment header is malformed: rebuild it from the offer
#   new_payment     this authorization or payment-identifier is spent: sign a fresh one
#   retry           transient: resend after `after` seconds (`samePayment`: resend the same one)
#   wait_until      a budget or limit resets at `at` (unix seconds)
#   use_method      another HTTP method is allowed here
#   discover        nothing is sold here: see /tools
#   none            nothing the agent can do (blocked, or an error on our side)
_FIX_PAYMENT_PREFIXES = ("payment_header_", "invalid_payload", "invalid_exact_evm_payload", "invalid_x402_version",
                         "invalid_payment_identifier")
_NEW_PAYMENT = frozenset({"payment_already_settled", "payment_identifier_conflict"})
_SAME_PAYMENT = frozenset({"settlement_pending", "settlement_unknown", "payment_in_flight", "settlement_unavailable",
                           "facilitator_unavailable", "ledger_unavailable", "store_unavailable",
                           "upstream_timeout", "upstream_unavailable"})
_OTHER_TOOL = frozenset({"tool_disabled", "upstream_circuit_open", "price_guard"})


def next_step(code: str, status: int, fields: dict[str, Any]) -> dict[str, Any]:
    reset_at = fields.get("resetsAt") or fields.get("retryAt")
    retry_after = fields.get("retryAfter")
    if status == 402:
        return {"action": "pay", "offer": "PAYMENT-REQUIRED",
                "hint": "sign accepts[0] as an EIP-3009 authorization and resend the request as PAYMENT-SIGNATURE"}
    if code in _OTHER_TOOL:
        step: dict[str, Any] = {"action": "discover", "tools": "/tools"}
        if retry_after is not None:
            step.update(action="retry", after=retry_after, samePayment=True)
        return step
    if reset_at is not None:
        return {"action": "wait_until", "at": reset_at}
    if code in ("invalid_arguments", "invalid_json_body", "request_too_large", "request_headers_too_large",
                "invalid_parameter"):
        names = [f.get("field") for f in fields.get("fields") or [] if isinstance(f, dict) and f.get("field")]
        return {"action": "fix_arguments", "fields": names}
    if code in _NEW_PAYMENT:
        return {"action": "new_payment", "hint": "sign a fresh authorization (and a new payment-identifier)"}
    if code.startswith(_FIX_PAYMENT_PREFIXES):
        return {"action": "fix_payment", "hint": "rebuild PAYMENT-SIGNATURE from the offer in PAYMENT-REQUIRED"}
    if retry_after is not None:
        return {"action": "retry", "after": retry_after, "samePayment": code in _SAME_PAYMENT}
    if code == "method_not_allowed":
        return {"action": "use_method", "allowed": fields.get("allowed", [])}
    if code == "not_found":
        return {"action": "discover", "tools": "/tools"}
    return {"action": "none"}
