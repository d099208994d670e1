"""A paid stream's outcome as an MCP tool result.

Over HTTP, a ``stream: true`` tool that settles by what it delivered (``upto``) relays the upstream's
answer as it comes and tells the settlement last (``event: x402-settlement``; the bytes already went
out: a risk the README states). The MCP surface does not stream: it reads the whole inner answer
before it builds the tool result, so it knows the outcome and holds the content back unless the
payment settled (the x402 MCP transport: no output when settlement fails after execution; a success
carries ``_meta["x402/payment-response"]``). A stream that is not SSE has no such event: its ledger
row says (settled before the inner answer ended: the relay settles before its last byte).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.pipeline.stages.relay import SETTLEMENT_EVENT
from settlement.ledger import Payment, PaymentState

__all__ = ["ledger_outcome", "split_settlement_event"]

_EVENT_LINE = "event: " + SETTLEMENT_EVENT


def split_settlement_event(text: str) -> tuple[str, dict[str, Any] | None]:
    """The stream's text without its final ``x402-settlement`` event, and that event's data (None
    when the stream has none, or one that is not a JSON object)."""
    at = text.rfind(_EVENT_LINE)
    if at < 0 or (at > 0 and text[at - 1] != "\n"):
        return text, None
    data = [line[5:].lstrip() for line in text[at:].splitlines()[1:] if line.startswith("data:")]
    try:
        outcome = json.loads("\n".join(data))
    except ValueError:
        return text, None
    return (text[:at], outcome) if isinstance(outcome, dict) else (text, None)


def ledger_outcome(row: Payment | None) -> dict[str, Any]:
    """A stream's outcome from its ledger row, in the shape of the settlement event."""
    if row is None:
        return {"success": False, "error": "settlement_unknown",
                "message": "the payment's outcome is not known; send the same payment again to learn it"}
    if row.state == PaymentState.SETTLED and row.tx_hash:
        return {"success": True, "transaction": row.tx_hash, "network": row.network, "payer": row.payer,
                "amount": str(row.amount), "paymentId": row.id}
    return {"success": False, "error": row.error_reason or f"settlement_{row.state}", "paymentId": row.id,
            "state": str(row.state), "message": "the payment did not settle; the stream's content is withheld"}
