"""The dashboard's numbers: the ledger summary (persistent) joined with this process's metrics
and the circuit breakers, with amounts in atomic units and in the token's decimals.

Revenue is ``settlement.finance.summary``'s (as ``x402gw ledger summary`` prints it): ``gross``
(settled amounts), ``refunds`` (refunds owed on settled payments, paid back or not) and ``net``
(gross - refunds), per asset. Per tool ``revenue`` is its net; the chart plots net."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from catalog import Catalogs, format_amount
from gateway.errors import GatewayError
from gateway.ops.admin.queries import ledger_summary
from gateway.ops.metrics import GatewayMetrics, ToolCounts

__all__ = ["Asset", "BreakerStates", "Dashboard"]

BreakerStates = Callable[[], Mapping[str, str]]


@dataclass(frozen=True)
class Asset:
    address: str
    name: str
    decimals: int

class Dashboard:
    def __init__(
        self, engine: Engine, catalogs: Catalogs, metrics: GatewayMetrics, breakers: BreakerStates | None = None,
        native_usd_rates: Mapping[str, Decimal] | None = None,
    ) -> None:
        self.engine = engine
        self.native_usd_rates = dict(native_usd_rates or {})
        self.catalogs = catalogs
        self.metrics = metrics
        self.breakers = breakers
        self.assets: dict[str, Asset] = {}
        self.tool_assets = {tool.name: tool.payment.asset for tool in catalogs.tools}
        for terms in (offer.terms for tool in catalogs.tools for offer in tool.offers):
            self.assets.setdefault(terms.asset, Asset(terms.asset, terms.asset_name, terms.decimals))
        # The catalog's dollar tokens (usd_pegged) count as dollars in net of gas, with the registry's.
        self.usd_assets = {(o.terms.network, o.terms.asset) for t in catalogs.tools for o in t.offers if o.terms.usd_pegged}

    def _amount(self, atomic: int, asset: str | None, decimals: int | None = None) -> dict[str, Any]:
        """``decimals``: the ledger's, where the number comes from ledger rows; else the catalog's."""
        known = self._known(asset)
        if decimals is None and known is not None:
            decimals = known.decimals
        return {
            "atomic": str(atomic),
            "decimal": format_amount(atomic, decimals) if decimals is not None else None,
            "asset": asset,
        }

    def _known(self, asset: str | None) -> Asset | None:
        return self.assets.get(asset or "") or next(
            (a for address, a in self.assets.items() if address.lower() == (asset or "").lower()), None
        )

    def _asset_name(self, asset: str | None) -> str | None:
        known = self._known(asset)
        return known.name if known else None

    def _revenue(self, row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``gross``, ``refunds``, ``net`` of a summary row, as amounts."""
        return {name: self._amount(row[name], row["asset"], row["decimals"]) for name in ("gross", "refunds", "net")}

    def _breakers(self) -> dict[str, str] | None:
        if self.breakers is None:
            return None
        return {name: state for name, state in sorted(self.breakers().items()) if state != "closed"}

    async def data(self, range_key: str = "24h") -> dict[str, Any]:
        now = datetime.now(UTC)
        try:
            summary = await asyncio.to_thread(
                ledger_summary, self.engine, now, range_key, self.native_usd_rates, self.usd_assets
            )
        except SQLAlchemyError as exc:
            raise GatewayError("ledger_unavailable", "the payment ledger is unavailable; retry later", status=503) from exc
        live = self.metrics.per_tool()
        names = [tool.name for tool in self.catalogs.tools]
        names += sorted(set(summary["tools"]) - set(names))
        tools = [self._tool_entry(name, summary["tools"].get(name), live.get(name, ToolCounts())) for name in names]
        return {
            "generatedAt": now.isoformat(),
            "range": summary["range"],
            "revenue": self._chart(summary),
            "totals": [
                {"asset": t["asset"], "assetName": self._asset_name(t["asset"]), **self._revenue(t)}
                for t in summary["totals"]
            ],
            "tools": tools,
            "topPayers": [
                {"payer": p["payer"], "payments": p["payments"], "amount": self._amount(p["amount"], p["asset"])}
                for p in summary["topPayers"]
            ],
            "pendingSettlements": [
                {**p, "amount": self._amount(p["amount"], p["asset"])} for p in summary["pending"]
            ],
            "openCircuitBreakers": self._breakers(),
            "netOfGas": summary["netOfGas"],
            "webhookDeliveries": summary["webhookDeliveries"],
        }

    def _tool_entry(self, name: str, row: Mapping[str, Any] | None, counts: ToolCounts) -> dict[str, Any]:
        """One tool's line: the ledger's counts and revenue (all time) and this process's counters."""
        row = row or {
            "asset": None, "decimals": None, "states": {}, "gross": 0, "refunds": 0, "net": 0, "byAsset": [],
            "refundsOwed": 0, "refunded": 0,
        }
        row = {**row, "asset": row["asset"] or self.tool_assets.get(name)}
        states = row["states"]
        revenue = self._revenue(row)
        return {
            "tool": name,
            "calls": sum(states.values()),
            "settled": states.get("settled", 0),
            "failed": states.get("failed", 0),
            "voided": states.get("voided", 0),
            "open": states.get("settling", 0) + states.get("pending", 0),
            "refundsOwed": row["refundsOwed"],
            "refunded": row["refunded"],
            "revenue": revenue["net"],
            **revenue,
            "revenueByAsset": [{"asset": r["asset"], **self._revenue(r)} for r in row["byAsset"]],
            "sinceStart": {
                "challenges": counts.challenges, "paymentsReceived": counts.received,
                "rejected": counts.rejected, "rejectedByReason": counts.rejected_by_reason,
                "upstreamOk": counts.upstream_ok, "upstreamFailed": counts.upstream_failed,
                "schemaDrift": counts.schema_drift,
                "settled": counts.settled, "settlementFailed": counts.failed, "pending": counts.pending,
            },
        }

    def _chart(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Net revenue per bucket of the range, in one asset: the one that earned most (net, then
        gross) in the range, else the catalog's first. Each point has its gross and refunds too."""
        series = summary["revenue"]
        chart_asset = (max(series, key=lambda a: (sum(p["net"] for p in series[a]["points"].values()),
                                                  sum(p["gross"] for p in series[a]["points"].values())))
                       if series else next(iter(self.assets), None))
        empty = {"gross": 0, "refunds": 0, "net": 0}
        chosen = series.get(chart_asset or "", {"decimals": None, "points": dict.fromkeys(summary["buckets"], empty)})
        decimals = chosen["decimals"]
        points = chosen["points"]
        total = {name: sum(p[name] for p in points.values()) for name in ("gross", "refunds", "net")}
        return {
            "unit": summary["unit"],
            "measure": "net",
            "asset": chart_asset,
            "assetName": self._asset_name(chart_asset),
            "points": [
                {"start": key + "Z", **self._amount(p["net"], chart_asset, decimals),
                 **{name: self._amount(p[name], chart_asset, decimals) for name in ("gross", "refunds", "net")}}
                for key, p in points.items()
            ],
            "total": self._amount(total["net"], chart_asset, decimals),
            **{name: self._amount(total[name], chart_asset, decimals) for name in ("gross", "refunds", "net")},
        }
