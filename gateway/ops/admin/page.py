"""The dashboard page: one HTML document with inline CSS, no script, and the revenue chart as an
SVG drawn here, so it works with no network beyond the gateway."""

from __future__ import annotations

from html import escape
from typing import Any

from gateway.ops.admin.queries import RANGES

__all__ = ["BAR_COLOR", "render_page"]

BAR_COLOR = "#e4572e"  # used by nothing else on the page: a screenshot test looks for it

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
         f'width="100%" role="img" aria-label="net revenue (settled minus refunds) per {escape(revenue["unit"])}">'),
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


def _tool_rows(data: dict[str, Any]) -> str:
    return "".join(
        f'<tr><td>{escape(t["tool"])}</td><td>{t["calls"]}</td><td>{t["settled"]}</td>'
        f'<td>{t["failed"]}</td><td>{t["voided"]}</td><td>{t["open"]}</td><td>{t["refundsOwed"]}</td>'
        f'<td>{t["sinceStart"]["challenges"]}</td><td>{t["sinceStart"]["rejected"]}</td>'
        f'<td>{t["sinceStart"]["upstreamFailed"]}</td><td>{t["sinceStart"]["schemaDrift"]}</td>'
        f'<td>{_money(t["gross"])}</td><td>{_money(t["refunds"])}</td>'
        f'<td>{_money(t["net"])}</td></tr>'
        for t in data["tools"]
    )


def _payer_rows(data: dict[str, Any]) -> str:
    return "".join(
        f'<tr><td class="mono">{escape(p["payer"])}</td><td>{p["payments"]}</td><td>{_money(p["amount"])}</td></tr>'
        for p in data["topPayers"]
    ) or '<tr><td colspan="3" class="muted">no settled payments yet</td></tr>'


def _pending_rows(data: dict[str, Any]) -> str:
    return "".join(
        f'<tr><td>{p["id"]}</td><td>{escape(p["createdAt"][:19])}</td><td>{escape(p["tool"])}</td>'
        f'<td class="mono">{escape(p["payer"])}</td><td>{_money(p["amount"])}</td><td>{escape(p["state"])}</td>'
        f'<td class="mono">{escape(p["transaction"] or "")}</td></tr>'
        for p in data["pendingSettlements"]
    ) or '<tr><td colspan="7" class="muted">none</td></tr>'


def _gas_rows(data: dict[str, Any]) -> str:
    return "".join(
        f'<tr><td>{escape(g["owner"])}</td><td>{escape(g["tool"])}</td><td class="mono">{escape(g["asset"])}</td>'
        f'<td>{escape(g["network"])}</td><td>{escape(g["gross"])}</td><td>{escape(g["refunds"])}</td>'
        f'<td>{escape(g["gas"])}</td><td>{escape(g["gas_usd"] or "-")}</td><td>{escape(g["net_usd"] or "-")}</td></tr>'
        for g in data["netOfGas"]
    ) or '<tr><td colspan="9" class="muted">no payments yet</td></tr>'


def _delivery_rows(data: dict[str, Any]) -> str:
    return "".join(
        f'<tr><td>{d["id"]}</td><td>{escape(d["type"])}</td><td>{escape(d["owner"])}/{escape(d["endpoint"])}</td>'
        f'<td>{escape(d["status"])}</td><td>{d["attempts"]}</td><td>{escape(str(d["lastStatus"] or "-"))}</td>'
        f'<td class="mono">{escape(d["eventId"])}</td></tr>'
        for d in data["webhookDeliveries"]
    ) or '<tr><td colspan="7" class="muted">none</td></tr>'


def render_page(data: dict[str, Any]) -> str:
    revenue = data["revenue"]
    asset_name = escape(revenue["assetName"] or revenue["asset"] or "")
    rows = _tool_rows(data)
    payers = _payer_rows(data)
    pending = _pending_rows(data)
    net_of_gas = _gas_rows(data)
    deliveries = _delivery_rows(data)
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
<body><header><h1>x402gw</h1><span>net revenue {escape(data["range"])}: {_money(revenue["net"])} {asset_name}
(gross {_money(revenue["gross"])}, refunds {_money(revenue["refunds"])})</span>
<span class="muted">generated {escape(data["generatedAt"][:19])}Z</span></header>
<main>
<section class="wide" id="revenue"><h2>Net revenue (settled minus refunds) per {escape(revenue["unit"])} ({asset_name})</h2>
<nav>{ranges}<a href="/admin/data.json">data.json</a></nav>{_revenue_svg(revenue)}</section>
<section class="wide" id="tools"><h2>Per tool</h2><table>
<tr><th>tool</th><th>paid calls</th><th>settled</th><th>failed</th><th>upstream failed (voided)</th><th>open</th>
<th>refunds owed</th><th>402s*</th><th>rejected*</th><th>upstream errors*</th><th>schema drift*</th><th>gross</th><th>refunds</th>
<th>net revenue</th></tr>{rows}</table>
<p class="muted">Ledger counts and revenue are all-time (revenue in the tool's main asset; gross: settled amounts,
refunds: owed on settled payments, paid back or not, net: gross minus refunds); * since this process started.</p></section>
<section class="wide" id="net-of-gas"><h2>Revenue net of gas</h2><table>
<tr><th>owner</th><th>tool</th><th>asset</th><th>network</th><th>gross</th><th>refunds</th><th>gas (native)</th>
<th>gas $</th><th>net of gas $</th></tr>{net_of_gas}</table>
<p class="muted">Gas: what the settlement key paid for these payments' transactions (a batch's shared exactly);
in dollars with X402GW_NATIVE_USD_RATE; net of gas: gross minus refunds minus gas, for dollar tokens.</p></section>
<section id="payers"><h2>Top payers</h2><table><tr><th>payer</th><th>payments</th><th>amount</th></tr>{payers}</table></section>
<section id="breakers"><h2>Open circuit breakers</h2><table><tr><th>upstream</th><th>state</th></tr>{breaker_rows}</table></section>
<section class="wide" id="pending"><h2>Pending settlements</h2><table>
<tr><th>id</th><th>created (UTC)</th><th>tool</th><th>payer</th><th>amount</th><th>state</th><th>transaction</th></tr>
{pending}</table></section>
<section class="wide" id="webhooks"><h2>Webhook deliveries (latest)</h2><table>
<tr><th>id</th><th>event</th><th>owner/endpoint</th><th>status</th><th>attempts</th><th>last answer</th><th>event id</th></tr>
{deliveries}</table><p class="muted">All of them, and replay: GET /admin/webhooks, x402gw webhooks list|replay.</p></section>
</main></body></html>"""
