"""The ledger's aggregates for the dashboard, amounts as ``int`` atomic units: per tool and state,
top payers, open settlements, and revenue (gross, refunds, net) per tool, per asset and per time
bucket and asset.

Revenue is not computed here: it comes from ``settlement.finance.summary`` (``summarize`` and
``rollup``), the one definition ``x402gw ledger summary`` prints too. The SQL here counts payments,
ranks payers by what they paid and lists open settlements. Synchronous (the dashboard runs it in a
thread).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Numeric, Row, cast, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import settlement.ledger.outbox as outbox
from settlement.finance.export import Filters
from settlement.finance.summary import Dimension, Group, rollup, summarize
from settlement.ledger import OPEN_STATES, Payment, PaymentState

__all__ = ["PENDING_ROWS", "RANGES", "TOP_PAYERS", "ledger_summary", "settled_revenue_by_bucket"]

RANGES: dict[str, tuple[str, int]] = {"24h": ("hour", 24), "7d": ("day", 7), "30d": ("day", 30)}
TOP_PAYERS = 10
PENDING_ROWS = 50
WEBHOOK_ROWS = 20  # the latest webhook deliveries on the page (all of them: GET /admin/webhooks)


def _paid_by_payer(engine: Engine) -> Any:
    """What a payer paid in settled payments (gross, for ranking payers; not revenue, which is
    ``settlement.finance.summary``'s). SQLite keeps amounts as decimal text: SUM of text is a float
    there, so cast to an integer (exact to 2**63 atomic units); PostgreSQL sums NUMERIC exactly."""
    if engine.dialect.name == "sqlite":
        return func.sum(cast(Payment.amount, BigInteger))
    return func.sum(cast(Payment.amount, Numeric(78, 0)))


def _bucket_keys(now: datetime, unit: str, count: int) -> list[str]:
    if unit == "hour":
        last = now.replace(minute=0, second=0, microsecond=0)
        step = timedelta(hours=1)
    else:
        last = now.replace(hour=0, minute=0, second=0, microsecond=0)
        step = timedelta(days=1)
    return [(last - step * i).strftime("%Y-%m-%dT%H:00:00") for i in reversed(range(count))]



def ledger_summary(engine: Engine, now: datetime, range_key: str = "24h", rates: Mapping[str, Decimal] | None = None,
                   usd_assets: Collection[tuple[str, str]] = ()) -> dict[str, Any]:
    """Aggregates over the ledger, amounts as int atomic units: per tool and state, top payers,
    open settlements, revenue per tool and per asset (all time) and per time bucket and asset (the
    range); ``netOfGas``: per owner, tool, asset and network, the summary's rows with gas (wei, the
    native coin, dollars with ``rates``) and net minus gas in dollars, as decimal strings.
    Synchronous (run it in a thread)."""
    unit, count = RANGES[range_key]
    keys = _bucket_keys(now, unit, count)
    start = datetime.fromisoformat(keys[0]).replace(tzinfo=UTC)
    paid = _paid_by_payer(engine)
    with Session(engine) as session:
        by_tool_state = session.execute(
            select(Payment.tool, Payment.asset, Payment.state, func.count()).group_by(
                Payment.tool, Payment.asset, Payment.state
            )
        ).all()
        payers = session.execute(
            select(Payment.payer, Payment.asset, func.count(), paid.label("total"))
            .where(Payment.state == PaymentState.SETTLED.value)
            .group_by(Payment.payer, Payment.asset)
            .order_by(paid.desc(), Payment.payer)
            .limit(TOP_PAYERS)
        ).all()
        pending = session.scalars(
            select(Payment)
            .where(Payment.state.in_([s.value for s in OPEN_STATES]))
            .order_by(Payment.created_at)
            .limit(PENDING_ROWS)
        ).all()
    per_owner_tool = summarize(engine, ("owner", "tool"))
    per_tool = rollup(per_owner_tool, (1,))
    return {
        "range": range_key,
        "unit": unit,
        "buckets": keys,
        "tools": _per_tool(by_tool_state, per_tool),
        "totals": [_revenue(g) for g in rollup(per_tool)],
        "topPayers": [
            {"payer": payer, "asset": asset, "payments": int(n), "amount": int(total or 0)}
            for payer, asset, n, total in payers
        ],
        "pending": [_pending_row(row) for row in pending],
        "revenue": settled_revenue_by_bucket(engine, unit, start, keys),
        "netOfGas": [g.to_json(("owner", "tool"), rates, usd_assets) for g in per_owner_tool],
        "webhookDeliveries": recent_deliveries(engine),
    }


def recent_deliveries(engine: Engine, limit: int = WEBHOOK_ROWS) -> list[dict[str, Any]]:
    """The latest webhook deliveries (``settlement.ledger.outbox``), newest first: what was sent
    where and how it went; never a secret (the outbox holds none)."""
    with engine.connect() as connection:
        rows = outbox.list_rows(connection, limit=limit)
    return [
        {"id": r["id"], "eventId": r["event_id"], "type": r["event_type"], "endpoint": r["endpoint"],
         "owner": r["owner"], "status": r["status"], "attempts": r["attempts"], "lastStatus": r["last_status"],
         "createdAt": r["created_at"].isoformat() if r["created_at"] is not None else None}
        for r in rows
    ]


def _revenue(group: Group) -> dict[str, Any]:
    return {"asset": group.asset, "decimals": group.decimals, "gross": group.gross, "refunds": group.refunds,
            "net": group.net}


def settled_revenue_by_bucket(engine: Engine, unit: str, start: datetime, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Revenue (``summarize`` by hour or day) per asset and time bucket since ``start``: per asset its
    ``decimals`` and ``points``, ``{bucket: {"gross", "refunds", "net"}}`` with every bucket of
    ``keys`` present (0 when nothing settled in it). A payment counts in the bucket it was created in."""
    dimension: Dimension = "hour" if unit == "hour" else "day"
    revenue: dict[str, dict[str, Any]] = {}
    for g in summarize(engine, (dimension,), Filters(start=start)):
        [bucket] = g.key
        key = f"{bucket}:00" if unit == "hour" else f"{bucket}T00:00:00"
        if key not in keys:
            continue
        entry = revenue.setdefault(g.asset, {
            "decimals": g.decimals, "points": {k: {"gross": 0, "refunds": 0, "net": 0} for k in keys},
        })
        point = entry["points"][key]
        point["gross"], point["refunds"], point["net"] = g.gross, g.refunds, g.net
    return revenue


_NO_REVENUE = {"gross": 0, "refunds": 0, "net": 0}


def _per_tool(
    by_tool_state: Sequence[Row[str, str, str, int]], revenue: Sequence[Group]
) -> dict[str, dict[str, Any]]:
    """Per tool: payments per state, and from the summary its revenue per asset (``byAsset``) and
    in its main asset (the one it earned most in, else the one its payments name): ``gross``,
    ``refunds``, ``net`` (also as ``revenue``), refunds owed and paid (counts)."""
    tools: dict[str, dict[str, Any]] = {}

    def entry(tool: str) -> dict[str, Any]:
        return tools.setdefault(tool, {
            "asset": None, "decimals": None, "states": {}, **_NO_REVENUE, "revenue": 0, "byAsset": [],
            "refundsOwed": 0, "refunded": 0,
        })

    for tool, asset, state, n in by_tool_state:
        row = entry(tool)
        row["asset"] = row["asset"] or asset
        row["states"][state] = row["states"].get(state, 0) + int(n)
    for g in revenue:
        row = entry(g.key[0])
        row["byAsset"].append(_revenue(g))
        row["refundsOwed"] += g.counts.get("refund_owed", 0)
        row["refunded"] += g.counts.get("refunded", 0)
    for row in tools.values():
        if row["byAsset"]:
            main = max(row["byAsset"], key=lambda r: (r["gross"], r["net"]))
            row.update(asset=main["asset"], decimals=main["decimals"], gross=main["gross"],
                       refunds=main["refunds"], net=main["net"], revenue=main["net"])
    return tools


def _pending_row(row: Payment) -> dict[str, Any]:
    return {
        "id": row.id, "createdAt": row.created_at.replace(tzinfo=row.created_at.tzinfo or UTC).isoformat(),
        "tool": row.tool, "payer": row.payer, "amount": row.amount, "asset": row.asset, "state": row.state,
        "transaction": row.tx_hash, "error": row.error_reason,
    }
