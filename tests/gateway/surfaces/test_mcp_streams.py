"""A paid stream's outcome over MCP (``gateway.surfaces.mcp_streams``): the settlement event split off
the stream, and a ledger row read as an outcome. Against anvil: tests/e2e/test_attacks_mcp_streams.py."""

from __future__ import annotations

import json

import pytest

from gateway.surfaces.mcp_streams import ledger_outcome, split_settlement_event
from settlement.ledger import Payment, PaymentState

SETTLED = {"success": True, "transaction": "0x" + "ab" * 32, "amount": "300"}


def stream(*events: str) -> str:
    return "".join(events)


def test_the_final_settlement_event_is_split_off_the_content() -> None:
    text = stream("data: one\n\n", "data: two\n\n", f"event: x402-settlement\ndata: {json.dumps(SETTLED)}\n\n")
    assert split_settlement_event(text) == ("data: one\n\ndata: two\n\n", SETTLED)


@pytest.mark.parametrize("text", [
    "data: one\n\n",  # no event: the ledger says
    "event: x402-settlement\ndata: {not json\n\n",
    'event: x402-settlement\ndata: ["success", true]\n\n',  # not an object
    'data: "xevent: x402-settlement\\ndata: {\\"success\\": true}"\n\n',  # inside another event's data, not a line of its own
])
def test_no_event_or_one_that_cannot_be_read_is_no_outcome(text: str) -> None:
    assert split_settlement_event(text) == (text, None)


def test_content_that_mimics_the_event_earlier_does_not_hide_the_real_one() -> None:
    """The upstream's content may say ``event: x402-settlement`` itself (a lie); the relay's own is last."""
    lie = f"event: x402-settlement\ndata: {json.dumps(SETTLED)}\n\n"
    failed = {"success": False, "error": "upto_settlement_would_revert"}
    text, outcome = split_settlement_event(lie + f"event: x402-settlement\ndata: {json.dumps(failed)}\n\n")
    assert outcome == failed and text == lie


def row(state: PaymentState, tx_hash: str | None) -> Payment:
    return Payment(id=7, state=state, tx_hash=tx_hash, network="eip155:31337", payer="0x" + "22" * 20, amount=300,
                   error_reason=None if state == PaymentState.SETTLED else "upto_settlement_would_revert")


def test_a_ledger_row_says_settled_only_with_its_transaction() -> None:
    assert ledger_outcome(row(PaymentState.SETTLED, "0x" + "cd" * 32))["success"] is True
    for state in (PaymentState.FAILED, PaymentState.PENDING, PaymentState.SETTLING, PaymentState.VERIFIED):
        outcome = ledger_outcome(row(state, None))
        assert outcome["success"] is False and outcome["paymentId"] == 7
    assert ledger_outcome(None)["error"] == "settlement_unknown"
