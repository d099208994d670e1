"""Revenue is defined once, in settlement.finance.summary: the admin dashboard (per tool, totals per
asset, the chart per hour or day) shows exactly what ``x402gw ledger summary --format json`` prints,
gross, refunds and net per asset, on SQLite and PostgreSQL; and no other code sums payment amounts.

    gross    settled amounts
    refunds  refunds owed on settled payments (paid back or not)
    net      gross - refunds
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from catalog import load_catalogs
from gateway.cli.main import main as cli
from gateway.ops.admin import Dashboard
from gateway.ops.metrics import GatewayMetrics
from gateway.settings import DEFAULT_CATALOG
from settlement.finance.export import Filters
from settlement.finance.summary import rollup, summarize
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, PG_ADMIN_URL
from tests.support.ledger_rows import force_row

ROOT = Path(__file__).resolve().parents[3]
USDC = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # the demo catalog's token (6 decimals)
EURC = "0x" + "e0" * 20  # a second token, in no catalog (2 decimals here)
ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
_nonces = itertools.count(1)


def add(ledger: Ledger, tool: str, amount: int, state: PaymentState, created_at: datetime, *,
        asset: str = USDC, decimals: int = 6, payer: str = ALICE, **update: Any) -> None:
    n = next(_nonces)
    row = ledger.record_verified(
        request_id=f"rev-{n}", owner="acme", tool=tool, method="GET", path=f"/{tool}", payer=payer,
        pay_to=PAY_TO, amount=amount, network="eip155:31337", asset=asset, decimals=decimals,
        nonce="0x" + f"{n:064x}", valid_before=2**40, authorization="{}", payment_identifier=None,
        fingerprint=None, settle_mode="after", created_at=created_at,
    )
    force_row(ledger, row.id, state=state, **update)


def seed(ledger: Ledger, now: datetime) -> None:
    earlier, old = now - timedelta(hours=3), now - timedelta(days=2)
    big = 2**60 + 1  # past 2**53: a float sum would lose the 1 (SQLite keeps amounts as text)
    add(ledger, "get_quote", 2000, PaymentState.SETTLED, now)
    add(ledger, "get_quote", 2000, PaymentState.SETTLED, earlier, payer=BOB)
    add(ledger, "get_quote", 2000, PaymentState.FAILED, now, error_reason="insufficient_funds")
    add(ledger, "get_quote", 2000, PaymentState.VOIDED, now)
    add(ledger, "get_quote", 2000, PaymentState.PENDING, now)
    add(ledger, "get_quote", 2000, PaymentState.SETTLING, earlier)
    add(ledger, "get_quote", 700, PaymentState.SETTLED, now, asset=EURC, decimals=2)  # same tool, other token
    add(ledger, "create_order", 10_000, PaymentState.SETTLED, now, refund_owed=10_000)  # owed, not paid
    add(ledger, "create_order", 8000, PaymentState.SETTLED, earlier, refund_owed=3000,  # paid back
        refund_tx="0x" + "0f" * 32, refunded_at=now)
    add(ledger, "create_order", 8000, PaymentState.SETTLED, old)
    add(ledger, "get_report", big, PaymentState.SETTLED, old, asset=EURC, decimals=2, refund_owed=1)
    add(ledger, "get_report", 5000, PaymentState.FAILED, earlier, asset=EURC, decimals=2)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    name = f"x402gw_rev_{uuid.uuid4().hex[:12]}"  # its own database: the numbers are exact
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cli_summary(url: str, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["ledger", "summary", "--format", "json", "--database-url", url, *args])
    assert result.exit_code == 0, result.output
    groups: list[dict[str, Any]] = json.loads(result.output)["groups"]
    return groups


def triple(amounts: dict[str, Any]) -> tuple[str, str, str]:
    return amounts["gross"]["atomic"], amounts["refunds"]["atomic"], amounts["net"]["atomic"]


def test_the_dashboard_shows_the_summary_revenue(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    try:
        now = datetime.now(UTC)
        seed(ledger, now)
        dashboard = Dashboard(ledger.engine, load_catalogs([DEFAULT_CATALOG]), GatewayMetrics())
        day, week = asyncio.run(dashboard.data("24h")), asyncio.run(dashboard.data("7d"))
        start = datetime.fromisoformat(day["revenue"]["points"][0]["start"].removesuffix("Z")).replace(tzinfo=UTC)
        hours = summarize(ledger, ("hour",), Filters(start=start))
        days_start = datetime.fromisoformat(week["revenue"]["points"][0]["start"].removesuffix("Z")).replace(tzinfo=UTC)
        days = summarize(ledger, ("day",), Filters(start=days_start))
        totals = summarize(ledger, ())
    finally:
        ledger.close()
    by_tool = cli_summary(ledger_url, "--by", "tool")

    # per tool and asset: the CLI's groups, every one of them on the dashboard, no token added to another
    shown = {(t["tool"], a["asset"].lower()): (triple(a), a["gross"]["decimal"])
             for t in day["tools"] for a in t["revenueByAsset"]}
    printed = {(g["tool"], g["asset"].lower()): ((g["gross_atomic"], g["refunds_atomic"], g["net_atomic"]), g["gross"])
               for g in by_tool}
    assert shown == printed
    assert printed[("create_order", USDC.lower())][0] == ("26000", "13000", "13000")  # owed and paid back both count
    assert printed[("get_quote", USDC.lower())][0] == ("4000", "0", "4000")  # failed, voided, open: not revenue
    assert printed[("get_quote", EURC)] == (("700", "0", "700"), "7")
    assert printed[("get_report", EURC)][0] == (str(2**60 + 1), "1", str(2**60))

    # the per-tool headline (revenue = net) is the tool's main asset's group
    tools = {t["tool"]: t for t in day["tools"]}
    assert triple(tools["get_quote"]) == ("4000", "0", "4000") and tools["get_quote"]["revenue"]["atomic"] == "4000"
    assert tools["create_order"]["revenue"] == {"atomic": "13000", "decimal": "0.013", "asset": USDC}
    assert (tools["create_order"]["refundsOwed"], tools["create_order"]["refunded"]) == (1, 1)
    assert triple(tools["request_report"]) == ("0", "0", "0")  # in the catalog, never paid

    # totals per asset (all time): the summary with no dimension, and the CLI's groups added up per asset
    assert [(t["asset"].lower(), triple(t)) for t in day["totals"]] == [
        (g.asset.lower(), (str(g.gross), str(g.refunds), str(g.net))) for g in totals
    ]
    assert [(g.asset, g.gross, g.refunds) for g in rollup(summarize_json(by_tool))] == [
        (g.asset, g.gross, g.refunds) for g in totals
    ]

    # the chart: net per bucket in the chosen asset, each point the summary's hour / day group
    # in the asset that earned most in the range: USDC over 24h, EURC (the 2-day-old 2**60) over 7 days
    for data, groups, suffix, asset in ((day, hours, ":00Z", USDC), (week, days, "T00:00:00Z", EURC)):
        chart = data["revenue"]
        assert chart["measure"] == "net" and chart["asset"].lower() == asset.lower()
        # a bucket of failed payments only is a summary group of 0 and no point on the chart (within
        # three hours after midnight UTC the seed's failed EURC call is alone in yesterday's bucket)
        expected = {g.key[0] + suffix: (str(g.gross), str(g.refunds), str(g.net))
                    for g in groups if g.asset.lower() == asset.lower() and g.gross != 0}
        points = {p["start"]: triple(p) for p in chart["points"] if p["gross"]["atomic"] != "0"}
        assert points == expected
        assert all(p["atomic"] == p["net"]["atomic"] for p in chart["points"])
        in_range = [g for g in rollup(groups) if g.asset.lower() == asset.lower()]
        assert [triple(chart)] == [(str(g.gross), str(g.refunds), str(g.net)) for g in in_range]
        assert chart["total"] == chart["net"]
    assert triple(day["revenue"]) == ("22000", "13000", "9000")  # the 2-day-old 8000 is outside 24h
    assert triple(week["revenue"]) == (str(2**60 + 701), "1", str(2**60 + 700))
    assert week["revenue"]["net"]["decimal"] == "{}.{:02d}".format(*divmod(2**60 + 700, 100))  # the ledger's decimals (2)


def summarize_json(groups: list[dict[str, Any]]) -> list[Any]:
    """The CLI's JSON groups back as summary Groups (to roll them up per asset)."""
    from settlement.finance.summary import Group

    return [Group((g["tool"],), g["network"], g["asset"], g["decimals"], int(g["gross_atomic"]),
                  int(g["refunds_atomic"])) for g in groups]


# -- no second definition -------------------------------------------------------------------------

_AMOUNT_COLUMNS = {"amount", "refund_owed"}
# The one sum of amounts allowed outside settlement/finance: what each payer paid, to rank the
# dashboard's top payers (a ranking with ORDER BY ... LIMIT in SQL, not revenue).
_ALLOWED = {("gateway/ops/admin/queries.py", "_paid_by_payer")}


def _sums_of_amounts(path: Path) -> list[str]:
    """Functions in ``path`` that aggregate a payment amount column in SQL (``func.sum`` / ``total``
    / ``avg`` over ``Payment.amount`` or ``Payment.refund_owed``), or carry a SQL string summing one."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"sum", "total", "avg"}
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "func"
                    and any(isinstance(n, ast.Attribute) and n.attr in _AMOUNT_COLUMNS
                            for arg in node.args for n in ast.walk(arg))):
                found.append(function.name)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.lower().replace(" ", "")
                if any(f"sum({col}" in text or f"sum(cast({col}" in text for col in _AMOUNT_COLUMNS):
                    found.append(function.name)
    return found


def test_no_sum_of_payment_amounts_outside_finance() -> None:
    offenders = []
    for room in ("gateway", "settlement", "catalog"):
        for path in sorted((ROOT / room).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("settlement/finance/"):
                continue
            offenders += [(relative, name) for name in _sums_of_amounts(path)]
    assert set(offenders) <= _ALLOWED, offenders
    assert offenders, "the scan finds the top payers' sum: it sees what it looks for"


def test_the_dashboard_queries_take_revenue_from_the_summary() -> None:
    source = (ROOT / "gateway/ops/admin/queries.py").read_text()
    tree = ast.parse(source)
    functions = {f.name: ast.get_source_segment(source, f) or "" for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef)}
    assert "summarize(" in functions["settled_revenue_by_bucket"] and "select(" not in functions["settled_revenue_by_bucket"]
    assert "summarize(" in functions["ledger_summary"] and "rollup(" in functions["ledger_summary"]
    assert "Payment.refund_owed" not in source and "Payment.amount" in source  # refunds are the summary's
