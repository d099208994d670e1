"""Every refusal names the agent's next step, derived in one place (gateway.errors.next_step)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import GatewayError


@pytest.mark.parametrize(
    ("code", "fields", "status", "expected"),
    [
        ("invalid_arguments", {"fields": [{"field": "quantity"}]}, None, {"action": "fix_arguments", "fields": ["quantity"]}),
        ("rate_limited", {"retryAfter": 7}, 429, {"action": "retry", "after": 7, "samePayment": False}),
        ("settlement_pending", {"retryAfter": 5, "transaction": "0xab"}, 503,
         {"action": "retry", "after": 5, "samePayment": True}),
        ("budget_exceeded", {"resetsAt": "2030-01-01T00:00:00Z"}, 403, {"action": "wait_until", "at": "2030-01-01T00:00:00Z"}),
        ("tool_disabled", {"retryable": False}, 503, {"action": "discover", "tools": "/tools"}),
        ("upstream_circuit_open", {"retryAfter": 30}, 503,
         {"action": "retry", "after": 30, "samePayment": True, "tools": "/tools"}),  # or another tool
        ("payment_already_settled", {"paymentId": 3}, None, {"action": "new_payment"}),
        ("payment_header_not_json", {}, 400, {"action": "fix_payment"}),
        ("payer_denied", {"retryable": False}, 403, {"action": "none"}),
        ("internal_error", {"requestId": "r"}, None, {"action": "none"}),
    ],
)
def test_next_step_is_derived_from_code_status_and_fields(
    code: str, fields: dict[str, Any], status: int | None, expected: dict[str, Any]
) -> None:
    body = GatewayError(code, "message", status=status, **fields).body()
    assert {k: v for k, v in body["next"].items() if k != "hint"} == expected
    assert body["error"] == code and all(body[k] == v for k, v in fields.items())  # existing fields are kept
