"""Reconcile's look at refunds recorded paid (``refund_unpaid``): each row whose ``refunded_at`` is
set, settled in the range, has its refund transaction read on chain (``owed_refunds.refund_status``);
one that did not move the amount owed from its sender to the payer (``landed``) is reported.

``ledger refunds`` lists only refunds still owed (no ``refunded_at``): a refund marked paid by SQL,
with no transaction or with one that paid the payer nothing (the payment's own settlement, say),
would leave every report while the payer was never paid back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from settlement.finance.owed_refunds import LANDED, RefundChain, refund_status
from settlement.ledger import Ledger, Payment, PaymentState

__all__ = ["in_blocks", "refunds_not_landed"]


def in_blocks(start: int, end: int, whole_chain: bool) -> ColumnElement[bool]:
    """Rows whose block is in [start, end]; over the whole chain, rows without a block too (a remote
    facilitator did not say which)."""
    in_range: ColumnElement[bool] = Payment.block_number.between(start, end)
    return or_(in_range, Payment.block_number.is_(None)) if whole_chain else in_range


def _refunded_in_range(ledger: Ledger, network: str, start: int, end: int, whole_chain: bool) -> list[Payment]:
    query = select(Payment).where(
        Payment.network == network, Payment.state == PaymentState.SETTLED.value, Payment.refunded_at.is_not(None),
        Payment.refund_owed.is_not(None), in_blocks(start, end, whole_chain),
    ).order_by(Payment.id)
    with Session(ledger.engine) as session:
        return list(session.scalars(query))


async def refunds_not_landed(
    ledger: Ledger, chain: RefundChain, network: str, start: int, end: int, whole_chain: bool,
    row_json: Callable[[Payment], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The refunds of ``network`` recorded paid whose transaction the chain does not show paying them."""
    found = []
    for row in await asyncio.to_thread(_refunded_in_range, ledger, network, start, end, whole_chain):
        status = await refund_status(chain, row)
        if status != LANDED:
            found.append({**row_json(row), "refund_owed": str(row.refund_owed), "refund_tx": row.refund_tx,
                          "refund_status": status})
    return found
