"""The ledger's aggregates for the dashboard, amounts as ``int`` atomic units: per tool and state,
top payers, open settlements, and settled revenue per time bucket and asset.

Synchronous SQL (the dashboard runs it in a thread); the revenue per bucket is one query, in
``settled_revenue_by_bucket``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Numeric, Row, cast, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from settlement.ledger import OPEN_STATES, Payment, PaymentState

__all__ = ["PENDING_ROWS", "RANGES", "TOP_PAYERS", "ledger_summary", "settled_revenue_by_bucket"]

RANGES: dict[str, tuple[str, int]] = {"24h": ("hour", 24), "7d": ("day", 7), "30d": ("day", 30)}
TOP_PAYERS = 10
PENDING_ROWS = 50


def _sum_amount(engine: Engine) -> Any:
    # SQLite keeps amounts as decimal text: SUM of text is a float there, so cast to an integer
    # (exact to 2**63 atomic units); PostgreSQL sums NUMERIC exactly.
    if engine.dialect.name == "sqlite":
        return func.sum(cast(Payment.amount, BigInteger))
    return func.sum(cast(Payment.amount, Numeric(78, 0)))


def _bucket(engine: Engine, unit: str) -> Any:
    """``created_at`` truncated to the hour or day (UTC), as ``YYYY-MM-DDTHH:00:00`` text."""
    if engine.dialect.name == "sqlite":
        fmt = "%Y-%m-%dT%H:00:00" if unit == "hour" else "%Y-%m-%dT00:00:00"
        return func.strftime(fmt, Payment.created_at)
    fmt = 'YYYY-MM-DD"T"HH24:00:00' if unit == "hour" else 'YYYY-MM-DD"T"00:00:00'
    return func.to_char(func.date_trunc(unit, func.timezone("UTC", Payment.created_at)), fmt)


def _bucket_keys(now: datetime, unit: str, count: int) -> list[str]:
    if unit == "hour":
        last = now.replace(minute=0, second=0, microsecond=0)
        step = timedelta(hours=1)
    else:
        last = now.replace(hour=0, minute=0, second=0, microsecond=0)
        step = timedelta(days=1)
    return [(last - step * i).strftime("%Y-%m-%dT%H:00:00") for i in reversed(range(count))]



def ledger_summary(engine: Engine, now: datetime, range_key: str = "24h") -> dict[str, Any]:
    """Aggregates over the ledger, amounts as int atomic units: per tool and state, top payers,
    open settlements, and settled revenue per time bucket and asset. Synchronous (run it in a thread)."""
    unit, count = RANGES[range_key]
    keys = _bucket_keys(now, unit, count)
    start = datetime.fromisoformat(keys[0]).replace(tzinfo=UTC)
    amount = _sum_amount(engine)
    settled = PaymentState.SETTLED.value
    with Session(engine) as session:
        by_tool_state = session.execute(
            select(Payment.tool, Payment.asset, Payment.state, func.count(), amount).group_by(
                Payment.tool, Payment.asset, Payment.state
            )
        ).all()
        refunds = session.execute(
            select(Payment.tool, func.count(), func.count(Payment.refunded_at))
            .where(Payment.refund_owed.is_not(None))
            .group_by(Payment.tool)
        ).all()
        payers = session.execute(
            select(Payment.payer, Payment.asset, func.count(), amount.label("total"))
            .where(Payment.state == settled)
            .group_by(Payment.payer, Payment.asset)
            .order_by(amount.desc(), Payment.payer)
            .limit(TOP_PAYERS)
        ).all()
        pending = session.scalars(
            select(Payment)
            .where(Payment.state.in_([s.value for s in OPEN_STATES]))
            .order_by(Payment.created_at)
            .limit(PENDING_ROWS)
        ).all()
        revenue = settled_revenue_by_bucket(session, engine, unit, start, keys)
    return {
        "range": range_key,
        "unit": unit,
        "buckets": keys,
        "tools": _per_tool(by_tool_state, refunds),
        "topPayers": [
            {"payer": payer, "asset": asset, "payments": int(n), "amount": int(total or 0)}
            for payer, asset, n, total in payers
        ],
        "pending": [_pending_row(row) for row in pending],
        "revenue": revenue,
    }


def settled_revenue_by_bucket(
    session: Session, engine: Engine, unit: str, start: datetime, keys: list[str]
) -> dict[str, dict[str, int]]:
    """The revenue query: settled amounts (gross) per asset and time bucket since ``start``, every
    bucket of ``keys`` present (0 when nothing settled in it)."""
    amount = _sum_amount(engine)
    bucket = _bucket(engine, unit)
    series = session.execute(
        select(bucket, Payment.asset, amount)
        .where(Payment.state == PaymentState.SETTLED.value, Payment.created_at >= start)
        .group_by(bucket, Payment.asset)
    ).all()
    revenue: dict[str, dict[str, int]] = {}
    for key, asset, total in series:
        key = str(key)
        if key in keys:
            revenue.setdefault(asset, dict.fromkeys(keys, 0))[key] += int(total or 0)
    return revenue


def _per_tool(
    by_tool_state: Sequence[Row[str, str, str, int, Any]], refunds: Sequence[Row[str, int, int]]
) -> dict[str, dict[str, Any]]:
    """Per tool: its asset, payments per state, settled revenue, refunds owed and paid."""
    settled = PaymentState.SETTLED.value
    tools: dict[str, dict[str, Any]] = {}
    for tool, asset, state, n, total in by_tool_state:
        entry = tools.setdefault(tool, {"asset": asset, "states": {}, "revenue": 0, "refundsOwed": 0, "refunded": 0})
        entry["states"][state] = int(n)
        if state == settled:
            entry["revenue"] += int(total or 0)
    for tool, owed, refunded in refunds:
        entry = tools.setdefault(tool, {"asset": None, "states": {}, "revenue": 0, "refundsOwed": 0, "refunded": 0})
        entry["refundsOwed"], entry["refunded"] = int(owed) - int(refunded), int(refunded)
    return tools


def _pending_row(row: Payment) -> dict[str, Any]:
    return {
        "id": row.id, "createdAt": row.created_at.replace(tzinfo=row.created_at.tzinfo or UTC).isoformat(),
        "tool": row.tool, "payer": row.payer, "amount": row.amount, "asset": row.asset, "state": row.state,
        "transaction": row.tx_hash, "error": row.error_reason,
    }
