"""The gateway's errors: refusals it answers with, and the one table that maps them to HTTP.

    GatewayError                    root; a stable ``code``, a ``message``, an HTTP ``status``, a ``next`` step
    ├── PaymentChallenge            a 402 carrying the offer (the challenge, gateway.protocol)
    ├── UpstreamUnreachable         no connection was made: another base URL is safe (gateway.upstream.bridge)
    ├── UpstreamFailure             the upstream answered, with a failure (gateway.upstream.failures)
    ├── SoapArgumentError           arguments a SOAP operation cannot carry; also a ValueError (gateway.upstream.soap)
    ├── BadRequest                  a refusal of the served facilitator's API (gateway.surfaces.facilitator_api)
    ├── CheckFailed                 a /readyz dependency answered wrongly (gateway.ops.health)
    └── GatewayConfigError          the gateway refuses to start: the message says what to fix
        ├── BridgeConfigError       a tool's upstream cannot be prepared (gateway.upstream.bridge)
        ├── CredentialsError        an upstream credential is missing (gateway.upstream.credentials)
        └── SoapDefinitionError     a WSDL or operation cannot be prepared (gateway.upstream.soap)

    Not (yet) under it: gateway.store's StoreUnavailable (the pipeline and safety translate it into
    a ``store_unavailable`` refusal where it can happen) and the dev kit's agent errors (a client's,
    on top of the gateway).

Every refusal has a stable ``code`` (snake_case, named in ``gateway.codes``), a human ``message``,
and optional machine-readable fields telling the agent what to do next (``retryAfter``,
``transaction``, ``paymentId``...). Bodies never carry ``str(exc)`` of an internal error or a stack
trace. Errors of the other packages (``settlement.errors``, ``catalog.errors``) are translated into
these at the seam.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from gateway.codes import FIX_PAYMENT_PREFIXES, REFUSALS
from gateway.headers import CACHE_CONTROL, PAYMENT_REQUIRED, RETRY_AFTER

__all__ = ["STATUS_BY_CODE", "GatewayConfigError", "GatewayError", "next_step"]

# code → HTTP status, from gateway.codes. Codes not listed default to their class's status.
STATUS_BY_CODE: dict[str, int] = {code: entry.status for code, entry in REFUSALS.items()}


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
        headers = {CACHE_CONTROL: "no-store", **self.headers}
        retry_after = self.fields.get("retryAfter")
        if retry_after is not None:
            headers[RETRY_AFTER] = str(int(retry_after))
        return Response(
            json.dumps(self.body(), separators=(",", ":")),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


class GatewayConfigError(GatewayError):
    """The gateway refuses to start: the message says what to fix. Never an HTTP answer."""

    status = 500

    def __init__(self, message: str, code: str = "invalid_configuration") -> None:
        super().__init__(code, message)


def next_step(code: str, status: int, fields: dict[str, Any]) -> dict[str, Any]:
    """What an agent should do about a refusal, from its code's kind in ``gateway.codes``, its
    status and its timing fields, in this one place, so every refusal (HTTP body, MCP result) says
    it the same way. A 402 is always ``pay``; ``resetsAt`` makes ``wait_until`` and ``retryAfter``
    makes ``retry`` unless the code's kind says better (the order below is the precedence)."""
    entry = REFUSALS.get(code)
    kind = entry.next if entry is not None else "fix_payment" if code.startswith(FIX_PAYMENT_PREFIXES) else "none"
    reset_at = fields.get("resetsAt") or fields.get("retryAt")
    retry_after = fields.get("retryAfter")
    if status == 402:
        return {"action": "pay", "offer": PAYMENT_REQUIRED,
                "hint": "sign accepts[0] as an EIP-3009 authorization and resend the request as PAYMENT-SIGNATURE"}
    if kind == "another_tool":
        step: dict[str, Any] = {"action": "discover", "tools": "/tools"}
        if retry_after is not None:
            step.update(action="retry", after=retry_after, samePayment=True)
        return step
    if reset_at is not None:
        return {"action": "wait_until", "at": reset_at}
    if kind == "fix_arguments":
        names = [f.get("field") for f in fields.get("fields") or [] if isinstance(f, dict) and f.get("field")]
        return {"action": "fix_arguments", "fields": names}
    if kind == "new_payment":
        return {"action": "new_payment", "hint": "sign a fresh authorization (and a new payment-identifier)"}
    if kind == "fix_payment":
        return {"action": "fix_payment", "hint": "rebuild PAYMENT-SIGNATURE from the offer in PAYMENT-REQUIRED"}
    if retry_after is not None:
        return {"action": "retry", "after": retry_after, "samePayment": entry is not None and entry.same_payment}
    if kind == "use_method":
        return {"action": "use_method", "allowed": fields.get("allowed", [])}
    if kind == "discover":
        return {"action": "discover", "tools": "/tools"}
    return {"action": "none"}
