"""The dashboard's numbers: the ledger summary (persistent) joined with this process's metrics
and the circuit breakers, with amounts in atomic units and in the token's decimals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
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
        self, engine: Engine, catalogs: Catalogs, metrics: GatewayMetrics, breakers: BreakerStates | None = None
    ) -> None:
        self.engine = engine
        self.catalogs = catalogs
        self.metrics = metrics
        self.breakers = breakers
        self.assets: dict[str, Asset] = {}
        self.tool_assets = {tool.name: tool.payment.asset for tool in catalogs.tools}
        for tool in catalogs.tools:
            terms = tool.payment
            self.assets.setdefault(terms.asset, Asset(terms.asset, terms.asset_name, terms.decimals))

    def _amount(self, atomic: int, asset: str | None) -> dict[str, Any]:
        known = self.assets.get(asset or "")
        return {
            "atomic": str(atomic),
            "decimal": format_amount(atomic, known.decimals) if known else None,
            "asset": asset,
        }

    def _breakers(self) -> dict[str, str] | None:
        if self.breakers is None:
            return None
        return {name: state for name, state in sorted(self.breakers().items()) if state != "closed"}

    async def data(self, range_key: str = "24h") -> dict[str, Any]:
        now = datetime.now(UTC)
        try:
            summary = await asyncio.to_thread(ledger_summary, self.engine, now, range_key)
        except SQLAlchemyError as exc:
            raise GatewayError("ledger_unavailable", "the payment ledger is unavailable; retry later", status=503) from exc
        live = self.metrics.per_tool()
        names = [tool.name for tool in self.catalogs.tools]
        names += sorted(set(summary["tools"]) - set(names))
        tools = []
        for name in names:
            row = summary["tools"].get(name, {"asset": None, "states": {}, "revenue": 0, "refundsOwed": 0, "refunded": 0})
            asset = row["asset"] or self.tool_assets.get(name)
            counts = live.get(name, ToolCounts())
            states = row["states"]
            tools.append({
                "tool": name,
                "calls": sum(states.values()),
                "settled": states.get("settled", 0),
                "failed": states.get("failed", 0),
                "voided": states.get("voided", 0),
                "open": states.get("settling", 0) + states.get("pending", 0),
                "refundsOwed": row["refundsOwed"],
                "refunded": row["refunded"],
                "revenue": self._amount(row["revenue"], asset),
                "sinceStart": {
                    "challenges": counts.challenges, "paymentsReceived": counts.received,
                    "rejected": counts.rejected, "rejectedByReason": counts.rejected_by_reason,
                    "upstreamOk": counts.upstream_ok, "upstreamFailed": counts.upstream_failed,
                    "settled": counts.settled, "settlementFailed": counts.failed, "pending": counts.pending,
                },
            })
        # The chart shows one asset: the one that earned most in the range (else the catalog's first).
        series = summary["revenue"]
        chart_asset = max(series, key=lambda a: sum(series[a].values())) if series else next(iter(self.assets), None)
        points = series.get(chart_asset or "", dict.fromkeys(summary["buckets"], 0))
        return {
            "generatedAt": now.isoformat(),
            "range": summary["range"],
            "revenue": {
                "unit": summary["unit"],
                "asset": chart_asset,
                "assetName": self.assets[chart_asset].name if chart_asset in self.assets else None,
                "points": [{"start": key + "Z", **self._amount(value, chart_asset)} for key, value in points.items()],
                "total": self._amount(sum(points.values()), chart_asset),
            },
            "tools": tools,
            "topPayers": [
                {"payer": p["payer"], "payments": p["payments"], "amount": self._amount(p["amount"], p["asset"])}
                for p in summary["topPayers"]
            ],
            "pendingSettlements": [
                {**p, "amount": self._amount(p["amount"], p["asset"])} for p in summary["pending"]
            ],
            "openCircuitBreakers": self._breakers(),
        }
