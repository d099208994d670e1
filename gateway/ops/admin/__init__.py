"""The operator's dashboard: ``GET /admin`` (one HTML page) and ``GET /admin/data.json`` (its numbers).

Access needs the admin token (``X402GW_ADMIN_TOKEN``): ``Authorization: Bearer <token>``, or once
``?token=<token>`` from a browser, answered with an HttpOnly session cookie and a redirect that drops
the token from the address bar. Without a configured token the dashboard does not exist (404), so a
gateway never exposes it by accident. Comparisons are constant-time.

The page works with no network beyond the gateway: inline CSS, no script, and the revenue chart is
an SVG drawn here. Numbers come from the ledger (persistent; queried off the event loop) and from
the metrics (this process since it started). Circuit breakers are read through an optional provider
(``Dashboard.breakers``): a callable returning ``{name: state}``; anything not ``closed`` is listed.

    routes.py     access (Bearer, cookie, one-time ``?token=``) and the two routes
    dashboard.py  the page's numbers: the ledger summary joined with this process's metrics
    queries.py    the ledger aggregates (``ledger_summary``), run off the event loop
    page.py       the HTML page and its SVG chart
"""

from __future__ import annotations

from gateway.ops.admin.dashboard import Asset, BreakerStates, Dashboard
from gateway.ops.admin.page import BAR_COLOR, render_page
from gateway.ops.admin.queries import RANGES, ledger_summary
from gateway.ops.admin.routes import COOKIE, AdminAuth, admin_routes

__all__ = [
    "BAR_COLOR",
    "COOKIE",
    "RANGES",
    "AdminAuth",
    "Asset",
    "BreakerStates",
    "Dashboard",
    "admin_routes",
    "ledger_summary",
    "render_page",
]
