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
    gas      wei the settlement key paid for the group's transactions (settled and failed rows
             alike: a reverted transaction costs gas too), each row's share (settlement.chain.gas);
             in the network's native coin (18 decimals), and in dollars with a rate per network
    net_usd  net - gas, in dollars: only for a dollar stablecoin (the registry's, or ``usd_assets``)
             on a network with a native coin rate. Exact decimals (never float)
    gas_missing  mined rows whose gas is not recorded yet (``x402gw ledger backfill-gas``)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.engine import Engine

from catalog.pricing import format_amount
from catalog.registry import stablecoin_at
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
    gas: int = 0  # wei
    gas_missing: int = 0

    @property
    def net(self) -> int:
        return self.gross - self.refunds

    def dollars(self, rate: Decimal | None, usd_asset: bool) -> tuple[Decimal | None, Decimal | None]:
        """(gas in dollars, net minus gas in dollars), each None when it cannot be told."""
        if rate is None:
            return None, None
        with localcontext() as exact:
            exact.prec = 200  # wider than any product of a 78-digit amount and a rate
            gas_usd = Decimal(self.gas) * rate / Decimal(10) ** NATIVE_DECIMALS
            net_usd = Decimal(self.net) / Decimal(10) ** self.decimals - gas_usd if usd_asset else None
        return gas_usd, net_usd

    def to_json(self, by: Sequence[Dimension], rates: Mapping[str, Decimal] | None = None,
                usd_assets: Collection[tuple[str, str]] = ()) -> dict[str, Any]:
        gas_usd, net_usd = self.dollars((rates or {}).get(self.network), is_usd(self.network, self.asset, usd_assets))
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
            "gas": format_amount(self.gas, NATIVE_DECIMALS),
            "gas_wei": str(self.gas),
            "gas_usd": None if gas_usd is None else decimal_text(gas_usd),
            "net_usd": None if net_usd is None else decimal_text(net_usd),
            "gas_missing": self.gas_missing,
            **{name: self.counts.get(name, 0) for name in COUNTED},
        }


NATIVE_DECIMALS = 18  # every EVM network's native coin (ETH, POL, AVAX, CELO...)


def is_usd(network: str, asset: str, usd_assets: Collection[tuple[str, str]] = ()) -> bool:
    """A dollar stablecoin: the registry's, or one the caller names as ``(network, asset)``."""
    coin = stablecoin_at(network, asset)
    return (coin is not None and coin.currency == "USD") or (network, asset.lower()) in {
        (n, a.lower()) for n, a in usd_assets
    }


def decimal_text(value: Decimal) -> str:
    """``Decimal`` as a plain decimal string: no exponent, trailing zeros trimmed."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# Counted outcomes: "pending" covers settling and pending (outcome not final yet); "refunded" is a
# refund paid back on chain, "refund_owed" one recorded and not (yet) paid.
COUNTED = ("payments", "settled", "failed", "pending", "voided", "refunded", "refund_owed")
# Rows whose transaction was mined (a failed row with a hash reverted on chain, or was refused
# before broadcast by a node; backfill-gas finds no receipt for the latter and leaves it).
MINED_STATES = (PaymentState.SETTLED, PaymentState.FAILED)


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
        Payment.refunded_at, Payment.network, Payment.asset, Payment.decimals, Payment.tx_hash, Payment.gas_cost,
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
    if r.gas_cost is not None:
        group.gas += r.gas_cost
    elif r.tx_hash and r.state in MINED_STATES:
        group.gas_missing += 1
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
        into.gas += g.gas
        into.gas_missing += g.gas_missing
        for name, n in g.counts.items():
            into.counts[name] = into.counts.get(name, 0) + n
    return [merged[k] for k in sorted(merged)]


def table(groups: Iterable[Group], by: Sequence[Dimension], rates: Mapping[str, Decimal] | None = None,
          usd_assets: Collection[tuple[str, str]] = ()) -> list[str]:
    """Aligned text lines: one header, one line per group (``-``: no rate for the network's coin,
    or net in dollars of a token that is not a dollar)."""
    header = [*by, "asset", "gross", "refunds", "net", "gas", "gas_usd", "net_usd", *COUNTED[1:]]
    lines = [header]
    for g in groups:
        data = g.to_json(by, rates, usd_assets)
        lines.append([*g.key, _short(g.asset), data["gross"], data["refunds"], data["net"], data["gas"],
                      data["gas_usd"] or "-", data["net_usd"] or "-", *(str(data[c]) for c in COUNTED[1:])])
    numeric = set(range(len(by) + 1, len(header)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in lines
    ]


def _short(address: str) -> str:
    return address if len(address) <= 12 else f"{address[:6]}…{address[-4:]}"
