"""Revenue per owner / tool / day / hour, with counts per outcome, computed in one streaming pass.

This module is the one definition of revenue: ``x402gw ledger summary`` and the admin dashboard
(per tool, totals per asset, and its chart per hour or day) both read it, and nothing else sums
payment amounts as revenue.

SQLite keeps amounts as decimal text (no exact wide integer), so the sums are Python ints over a
server-side cursor on every backend: memory grows with the number of groups, not of payments.
Amounts of different tokens are never added: the asset (and its network and decimals) is always
part of a group's key.

    gross    settled amounts
    refunds  refunds owed on settled payments (paid back or not: either way not earned)
    net      gross - refunds
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.engine import Engine

from catalog.pricing import format_amount
from settlement.finance.export import BATCH_ROWS, Filters
from settlement.ledger import Ledger, Payment, PaymentState

Dimension = Literal["owner", "tool", "day", "hour"]
DIMENSIONS: tuple[Dimension, ...] = ("owner", "tool", "day", "hour")


@dataclass(slots=True)
class Group:
    key: tuple[str, ...]
    network: str
    asset: str
    decimals: int
    gross: int = 0
    refunds: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def net(self) -> int:
        return self.gross - self.refunds

    def to_json(self, by: Sequence[Dimension]) -> dict[str, Any]:
        return {
            **dict(zip(by, self.key)),
            "network": self.network,
            "asset": self.asset,
            "decimals": self.decimals,
            "gross": format_amount(self.gross, self.decimals),
            "refunds": format_amount(self.refunds, self.decimals),
            "net": format_amount(self.net, self.decimals),
            "gross_atomic": str(self.gross),
            "refunds_atomic": str(self.refunds),
            "net_atomic": str(self.net),
            **{name: self.counts.get(name, 0) for name in COUNTED},
        }


# Counted outcomes: "pending" covers settling and pending (outcome not final yet); "refunded" is a
# refund paid back on chain, "refund_owed" one recorded and not (yet) paid.
COUNTED = ("payments", "settled", "failed", "pending", "voided", "refunded", "refund_owed")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _day(value: datetime) -> str:
    """``2025-03-01``: the UTC day a payment was created."""
    return _utc(value).date().isoformat()


def _hour(value: datetime) -> str:
    """``2025-03-01T13:00``: the UTC hour a payment was created."""
    return _utc(value).strftime("%Y-%m-%dT%H:00")


def _key(r: Any, by: Sequence[Dimension]) -> tuple[str, ...]:
    values = {"owner": r.owner, "tool": r.tool}
    return tuple(_day(r.created_at) if d == "day" else _hour(r.created_at) if d == "hour" else values[d] for d in by)


def summarize(ledger: Ledger | Engine, by: Sequence[Dimension], filters: Filters | None = None,
              batch_rows: int = BATCH_ROWS) -> list[Group]:
    """Groups sorted by key, then asset; ``by=()`` gives one group per asset (the totals).

    ``ledger`` may be a ``Ledger`` or its SQLAlchemy ``Engine`` (the dashboard holds only the engine)."""
    engine = ledger if isinstance(ledger, Engine) else ledger.engine
    filters = filters or Filters()
    query = filters.apply(select(
        Payment.owner, Payment.tool, Payment.created_at, Payment.state, Payment.amount, Payment.refund_owed,
        Payment.refunded_at, Payment.network, Payment.asset, Payment.decimals,
    ))
    groups: dict[tuple[Any, ...], Group] = {}
    with engine.connect() as conn:
        for r in conn.execution_options(stream_results=True, yield_per=batch_rows).execute(query):
            key = _key(r, by)
            full = (key, r.network, r.asset.lower(), r.decimals)
            group = groups.get(full)
            if group is None:
                group = groups[full] = Group(key, r.network, r.asset, r.decimals)
            _count(group, r)
    return [groups[k] for k in sorted(groups)]


def _count(group: Group, r: Any) -> None:
    counts = group.counts
    counts["payments"] = counts.get("payments", 0) + 1
    state = "pending" if r.state == PaymentState.SETTLING else r.state
    if state in COUNTED:
        counts[state] = counts.get(state, 0) + 1
    if r.state == PaymentState.SETTLED:
        group.gross += r.amount
        if r.refund_owed is not None:
            group.refunds += r.refund_owed
            outcome = "refunded" if r.refunded_at is not None else "refund_owed"
            counts[outcome] = counts.get(outcome, 0) + 1


def rollup(groups: Iterable[Group], keep: Sequence[int] = ()) -> list[Group]:
    """Groups merged down to the key positions in ``keep`` (``()``: one group per asset), still never
    adding different tokens; sorted like ``summarize``. Summing the groups of one pass is the same as
    summarizing with fewer dimensions, without a second pass over the ledger."""
    merged: dict[tuple[Any, ...], Group] = {}
    for g in groups:
        key = tuple(g.key[i] for i in keep)
        full = (key, g.network, g.asset.lower(), g.decimals)
        into = merged.get(full)
        if into is None:
            into = merged[full] = Group(key, g.network, g.asset, g.decimals)
        into.gross += g.gross
        into.refunds += g.refunds
        for name, n in g.counts.items():
            into.counts[name] = into.counts.get(name, 0) + n
    return [merged[k] for k in sorted(merged)]


def table(groups: Iterable[Group], by: Sequence[Dimension]) -> list[str]:
    """Aligned text lines: one header, one line per group."""
    header = [*by, "asset", "gross", "refunds", "net", *COUNTED[1:]]
    lines = [header]
    for g in groups:
        data = g.to_json(by)
        lines.append([*g.key, _short(g.asset), data["gross"], data["refunds"], data["net"],
                      *(str(data[c]) for c in COUNTED[1:])])
    numeric = set(range(len(by) + 1, len(header)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in lines
    ]


def _short(address: str) -> str:
    return address if len(address) <= 12 else f"{address[:6]}…{address[-4:]}"
