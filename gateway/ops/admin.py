"""The operator's dashboard: ``GET /admin`` (one HTML page) and ``GET /admin/data.json`` (its numbers).

Access needs the admin token (``X402GW_ADMIN_TOKEN``): ``Authorization: Bearer <token>``, or once
``?token=<token>`` from a browser, answered with an HttpOnly session cookie and a redirect that drops
the token from the address bar. Without a configured token the dashboard does not exist (404), so a
gateway never exposes it by accident. Comparisons are constant-time.

The page works with no network beyond the gateway: inline CSS, no script, and the revenue chart is
an SVG drawn here. Numbers come from the ledger (persistent; queried off the event loop) and from
the metrics (this process since it started). Circuit breakers are read through an optional provider
(``Dashboard.breakers``): a callable returning ``{name: state}``; anything not ``closed`` is listed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any, Literal
from urllib.parse import urlencode

from pydantic import SecretStr
from sqlalchemy import BigInteger, Numeric, cast, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from catalog import Catalogs, format_amount
from gateway.errors import GatewayError
from gateway.ops.metrics import GatewayMetrics, ToolCounts
from settlement.ledger import OPEN_STATES, Payment, PaymentState

__all__ = ["AdminAuth", "Dashboard", "admin_routes", "ledger_summary"]

COOKIE = "x402gw_admin"
BreakerStates = Callable[[], Mapping[str, str]]
RANGES: dict[str, tuple[str, int]] = {"24h": ("hour", 24), "7d": ("day", 7), "30d": ("day", 30)}
TOP_PAYERS = 10
PENDING_ROWS = 50
BAR_COLOR = "#e4572e"  # used by nothing else on the page: a screenshot test looks for it
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


# -- access -------------------------------------------------------------------------------------


class AdminAuth:
    """Bearer header, session cookie, or a one-time ``?token=`` that becomes the cookie."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token.get_secret_value().encode()
        # The cookie holds a value derived from the token, not the token: a leaked cookie
        # does not give the token (for Bearer use elsewhere), and rotating the token ends sessions.
        self._session = hmac.new(self._token, b"x402gw admin session v1", hashlib.sha256).hexdigest()

    def _is_token(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def decide(self, request: Request) -> Literal["ok", "redirect", "denied"]:
        query_token = request.query_params.get("token")
        if query_token is not None:
            return "redirect" if self._is_token(query_token) else "denied"
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._is_token(credentials.strip()):
            return "ok"
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return "ok"
        return "denied"

    def redirect(self, request: Request) -> Response:
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            COOKIE, self._session, path="/admin", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response


def _denied() -> Response:
    response = GatewayError("admin_unauthorized", "the admin token is missing or wrong", status=401).to_response()
    response.headers["WWW-Authenticate"] = 'Bearer realm="x402gw-admin"'
    return response


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asset:
    address: str
    name: str
    decimals: int


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
        bucket = _bucket(engine, unit)
        series = session.execute(
            select(bucket, Payment.asset, amount)
            .where(Payment.state == settled, Payment.created_at >= start)
            .group_by(bucket, Payment.asset)
        ).all()
    tools: dict[str, dict[str, Any]] = {}
    for tool, asset, state, n, total in by_tool_state:
        entry = tools.setdefault(tool, {"asset": asset, "states": {}, "revenue": 0, "refundsOwed": 0, "refunded": 0})
        entry["states"][state] = int(n)
        if state == settled:
            entry["revenue"] += int(total or 0)
    for tool, owed, refunded in refunds:
        entry = tools.setdefault(tool, {"asset": None, "states": {}, "revenue": 0, "refundsOwed": 0, "refunded": 0})
        entry["refundsOwed"], entry["refunded"] = int(owed) - int(refunded), int(refunded)
    revenue: dict[str, dict[str, int]] = {}
    for key, asset, total in series:
        key = str(key)
        if key in keys:
            revenue.setdefault(asset, dict.fromkeys(keys, 0))[key] += int(total or 0)
    return {
        "range": range_key,
        "unit": unit,
        "buckets": keys,
        "tools": tools,
        "topPayers": [
            {"payer": payer, "asset": asset, "payments": int(n), "amount": int(total or 0)}
            for payer, asset, n, total in payers
        ],
        "pending": [
            {
                "id": row.id, "createdAt": row.created_at.replace(tzinfo=row.created_at.tzinfo or UTC).isoformat(),
                "tool": row.tool, "payer": row.payer, "amount": row.amount, "asset": row.asset, "state": row.state,
                "transaction": row.tx_hash, "error": row.error_reason,
            }
            for row in pending
        ],
        "revenue": revenue,
    }


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


# -- page -----------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1c2430}
header{background:#14213d;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{opacity:.8}
main{padding:16px 24px;display:grid;grid-template-columns:1fr 1fr;gap:16px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px}
section.wide{grid-column:1/3}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:right;padding:3px 8px;border-bottom:1px solid #eef0f3}
th:first-child,td:first-child{text-align:left}td.mono{font-family:ui-monospace,monospace;font-size:12px}
.muted{color:#6b7280}nav a{margin-right:12px;color:#2563eb}
"""


def _revenue_svg(revenue: dict[str, Any]) -> str:
    points = revenue["points"]
    width, height, left, bottom, top = 1100, 240, 70, 28, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    values = [int(p["atomic"]) for p in points]
    peak = max(values, default=0) or 1
    slot = plot_w / max(len(points), 1)
    parts = [
        (f'<svg id="revenue-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
         f'width="100%" role="img" aria-label="settled revenue per {escape(revenue["unit"])}">'),
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#9ca3af"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#9ca3af"/>',
    ]
    peak_label = next((p["decimal"] or p["atomic"] for p in points if int(p["atomic"]) == peak), "0")
    parts.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" font-size="11" fill="#6b7280">'
                 f'{escape(peak_label)}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11" fill="#6b7280">0</text>')
    label_every = max(1, len(points) // 8)
    for i, (point, value) in enumerate(zip(points, values)):
        x = left + i * slot + slot * 0.15
        bar_h = plot_h * value / peak
        label = escape(f'{point["start"]}: {point["decimal"] or point["atomic"]}')
        if value:
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{slot * 0.7:.1f}" '
                f'height="{bar_h:.1f}" fill="{BAR_COLOR}"><title>{label}</title></rect>'
            )
        if i % label_every == 0 or i == len(points) - 1:
            stamp = point["start"][11:16] if revenue["unit"] == "hour" else point["start"][5:10]
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{height - 8}" text-anchor="middle" font-size="11" '
                         f'fill="#6b7280">{escape(stamp)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _money(amount: dict[str, Any]) -> str:
    return escape(amount["decimal"] if amount["decimal"] is not None else f'{amount["atomic"]} atomic')


def render_page(data: dict[str, Any]) -> str:
    revenue = data["revenue"]
    asset_name = escape(revenue["assetName"] or revenue["asset"] or "")
    rows = "".join(
        f'<tr><td>{escape(t["tool"])}</td><td>{t["calls"]}</td><td>{t["settled"]}</td>'
        f'<td>{t["failed"]}</td><td>{t["voided"]}</td><td>{t["open"]}</td><td>{t["refundsOwed"]}</td>'
        f'<td>{t["sinceStart"]["challenges"]}</td><td>{t["sinceStart"]["rejected"]}</td>'
        f'<td>{t["sinceStart"]["upstreamFailed"]}</td><td>{_money(t["revenue"])}</td></tr>'
        for t in data["tools"]
    )
    payers = "".join(
        f'<tr><td class="mono">{escape(p["payer"])}</td><td>{p["payments"]}</td><td>{_money(p["amount"])}</td></tr>'
        for p in data["topPayers"]
    ) or '<tr><td colspan="3" class="muted">no settled payments yet</td></tr>'
    pending = "".join(
        f'<tr><td>{p["id"]}</td><td>{escape(p["createdAt"][:19])}</td><td>{escape(p["tool"])}</td>'
        f'<td class="mono">{escape(p["payer"])}</td><td>{_money(p["amount"])}</td><td>{escape(p["state"])}</td>'
        f'<td class="mono">{escape(p["transaction"] or "")}</td></tr>'
        for p in data["pendingSettlements"]
    ) or '<tr><td colspan="7" class="muted">none</td></tr>'
    breakers = data["openCircuitBreakers"]
    breaker_rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(state)}</td></tr>" for name, state in (breakers or {}).items()
    ) or '<tr><td colspan="2" class="muted">none</td></tr>'
    ranges = "".join(
        f'<a href="/admin?range={key}">{"<b>" + key + "</b>" if key == data["range"] else key}</a>' for key in RANGES
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>x402gw dashboard</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>x402gw</h1><span>revenue {escape(data["range"])}: {_money(revenue["total"])} {asset_name}</span>
<span class="muted">generated {escape(data["generatedAt"][:19])}Z</span></header>
<main>
<section class="wide" id="revenue"><h2>Settled revenue per {escape(revenue["unit"])} ({asset_name})</h2>
<nav>{ranges}<a href="/admin/data.json">data.json</a></nav>{_revenue_svg(revenue)}</section>
<section class="wide" id="tools"><h2>Per tool</h2><table>
<tr><th>tool</th><th>paid calls</th><th>settled</th><th>failed</th><th>upstream failed (voided)</th><th>open</th>
<th>refunds owed</th><th>402s*</th><th>rejected*</th><th>upstream errors*</th><th>revenue</th></tr>{rows}</table>
<p class="muted">Ledger counts are all-time; * since this process started.</p></section>
<section id="payers"><h2>Top payers</h2><table><tr><th>payer</th><th>payments</th><th>amount</th></tr>{payers}</table></section>
<section id="breakers"><h2>Open circuit breakers</h2><table><tr><th>upstream</th><th>state</th></tr>{breaker_rows}</table></section>
<section class="wide" id="pending"><h2>Pending settlements</h2><table>
<tr><th>id</th><th>created (UTC)</th><th>tool</th><th>payer</th><th>amount</th><th>state</th><th>transaction</th></tr>
{pending}</table></section>
</main></body></html>"""


# -- routes ---------------------------------------------------------------------------------------


def admin_routes(dashboard: Dashboard, token: SecretStr | None) -> list[Route]:
    """``/admin`` and ``/admin/data.json``; both 404 when no admin token is configured."""
    auth = AdminAuth(token) if token is not None and token.get_secret_value() else None

    def gate(request: Request) -> Response | None:
        if auth is None:
            return GatewayError("not_found", "no tool is exposed at this path").to_response()
        decision = auth.decide(request)
        if decision == "redirect":
            return auth.redirect(request)
        return _denied() if decision == "denied" else None

    def range_of(request: Request) -> str:
        key = request.query_params.get("range", "24h")
        if key not in RANGES:
            raise GatewayError("invalid_range", f"range is one of {', '.join(RANGES)}", status=422)
        return key

    async def page(request: Request) -> Response:
        stop = gate(request)
        if stop is not None:
            return stop
        try:
            data = await dashboard.data(range_of(request))
        except GatewayError as err:
            return err.to_response()
        return HTMLResponse(render_page(data), headers=_SECURITY_HEADERS)

    async def data_json(request: Request) -> Response:
        stop = gate(request)
        if stop is not None:
            return stop
        try:
            data = await dashboard.data(range_of(request))
        except GatewayError as err:
            return err.to_response()
        return JSONResponse(data, headers=_SECURITY_HEADERS)

    return [Route("/admin", page, methods=["GET"]), Route("/admin/data.json", data_json, methods=["GET"])]
