"""The dashboard: who may see it, and that its numbers are the ledger's (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from catalog import load_catalogs
from gateway.ops.admin import COOKIE, Dashboard
from gateway.ops.metrics import GatewayMetrics
from gateway.settings import DEFAULT_CATALOG
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, PG_ADMIN_URL, Devchain, GatewayFactory
from tests.e2e.test_paid_call import pay
from tests.support.ledger_rows import force_row

TOKEN = "s3cret-admin-token"
ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # the demo catalog's token
_nonces = itertools.count(1)


# -- access ---------------------------------------------------------------------------------------


def test_without_an_admin_token_there_is_no_dashboard(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    with gateway.client() as client:
        for path in ("/admin", "/admin/data.json", f"/admin?token={TOKEN}"):
            assert client.get(path).status_code == 404, path
        assert client.get("/admin", headers={"Authorization": "Bearer anything"}).status_code == 404


def test_wrong_or_missing_credentials_are_refused(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(admin_token=TOKEN)
    with gateway.client() as client:
        for headers, params in (
            ({}, {}),
            ({"Authorization": "Bearer wrong"}, {}),
            ({"Authorization": f"Basic {TOKEN}"}, {}),
            ({}, {"token": "wrong"}),
        ):
            response = client.get("/admin", headers=headers, params=params)
            assert response.status_code == 401, (headers, params)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in response.text
        assert client.get("/admin/data.json").status_code == 401
    with gateway.client() as client:
        client.cookies.set(COOKIE, TOKEN)  # the session cookie is not the token
        assert client.get("/admin").status_code == 401


def test_bearer_token_opens_page_and_data(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with gateway.client() as client:
        page = client.get("/admin", headers=auth)
        data = client.get("/admin/data.json", headers=auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="revenue-chart"' in page.text
    assert "<script" not in page.text and "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert data.status_code == 200 and data.json()["openCircuitBreakers"] == {}  # breakers wired, none open


def test_token_in_the_url_becomes_an_httponly_cookie_and_leaves_the_url(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(admin_token=TOKEN)
    with gateway.client() as client:
        first = client.get("/admin", params={"token": TOKEN, "range": "7d"})
        assert first.status_code == 303
        assert first.headers["location"] == "/admin?range=7d"
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
        page = client.get("/admin?range=7d")  # the client kept the cookie
        assert page.status_code == 200 and 'id="revenue-chart"' in page.text
        assert client.get("/admin/data.json").json()["range"] == "24h"
        assert client.get("/admin/data.json?range=1y").status_code == 422


# -- numbers --------------------------------------------------------------------------------------


def add_payment(ledger: Ledger, tool: str, payer: str, amount: int, state: PaymentState, created_at: datetime,
                **update: Any) -> int:
    n = next(_nonces)
    row = ledger.record_verified(
        request_id=f"req-{n}-{tool}", owner="acme-legacy", tool=tool, method="GET", path=f"/{tool}",
        payer=payer, pay_to=PAY_TO, amount=amount, network="eip155:31337", asset=ASSET,
        nonce="0x" + f"{n:064x}", valid_before=2**40, authorization="{}", payment_identifier=None,
        fingerprint=None, settle_mode="after", created_at=created_at,
    )
    force_row(ledger, row.id, state=state, **update)
    return row.id


def seed(ledger: Ledger, now: datetime) -> dict[str, int]:
    two_hours_ago = now - timedelta(hours=2)
    add_payment(ledger, "get_quote", ALICE, 2000, PaymentState.SETTLED, now, tx_hash="0x" + "01" * 32)
    add_payment(ledger, "get_quote", ALICE, 2000, PaymentState.SETTLED, two_hours_ago, tx_hash="0x" + "02" * 32)
    add_payment(ledger, "get_quote", BOB, 2000, PaymentState.FAILED, now, error_reason="insufficient_funds")
    add_payment(ledger, "get_report", BOB, 5000, PaymentState.SETTLED, two_hours_ago, tx_hash="0x" + "03" * 32)
    add_payment(ledger, "get_report", BOB, 5000, PaymentState.SETTLED, now - timedelta(days=3))  # outside 24h
    add_payment(ledger, "get_weather", ALICE, 1000, PaymentState.VOIDED, now, upstream_status=500)
    pending = add_payment(ledger, "get_weather", BOB, 1000, PaymentState.PENDING, now, tx_hash="0x" + "04" * 32)
    add_payment(ledger, "create_order", ALICE, 10_000, PaymentState.SETTLED, now, refund_owed=10_000)
    return {"pending": pending}


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    name = f"x402gw_dash_{uuid.uuid4().hex[:12]}"  # its own database: the numbers are exact
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_data_matches_the_ledger(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    try:
        now = datetime.now(UTC)
        ids = seed(ledger, now)
        breakers = {"legacy": "open", "weather": "closed", "reports": "half_open"}
        dashboard = Dashboard(ledger.engine, load_catalogs([DEFAULT_CATALOG]), GatewayMetrics(), lambda: breakers)
        data = asyncio.run(dashboard.data("24h"))
        week = asyncio.run(dashboard.data("7d"))
    finally:
        ledger.close()

    tools = {t["tool"]: t for t in data["tools"]}
    assert list(tools) == ["get_quote", "get_weather", "create_order", "get_report", "request_report"]
    quote = tools["get_quote"]
    assert (quote["calls"], quote["settled"], quote["failed"], quote["voided"], quote["open"]) == (3, 2, 1, 0, 0)
    assert quote["revenue"] == {"atomic": "4000", "decimal": "0.004", "asset": ASSET}
    weather = tools["get_weather"]
    assert (weather["calls"], weather["voided"], weather["open"]) == (2, 1, 1)
    assert tools["get_report"]["revenue"]["decimal"] == "0.01"  # all time, not only the range
    assert (tools["create_order"]["refundsOwed"], tools["create_order"]["refunded"]) == (1, 0)
    assert tools["request_report"]["calls"] == 0 and tools["request_report"]["revenue"]["decimal"] == "0"

    assert [(p["payer"], p["payments"], p["amount"]["decimal"]) for p in data["topPayers"]] == [
        (ALICE, 3, "0.014"), (BOB, 2, "0.01"),
    ]
    [pending] = data["pendingSettlements"]
    assert (pending["id"], pending["tool"], pending["state"]) == (ids["pending"], "get_weather", "pending")
    assert pending["transaction"] == "0x" + "04" * 32 and pending["amount"]["atomic"] == "1000"
    assert data["openCircuitBreakers"] == {"legacy": "open", "reports": "half_open"}

    revenue = data["revenue"]
    assert revenue["unit"] == "hour" and revenue["asset"] == ASSET and revenue["assetName"] == "USD Coin"
    assert len(revenue["points"]) == 24
    assert revenue["points"][-1]["start"] == now.strftime("%Y-%m-%dT%H:00:00Z")
    # The chart plots net revenue (settlement.finance.summary): create_order's 10000 settled this
    # hour is refunded in full, so it is gross and not net.
    assert revenue["measure"] == "net"
    last = revenue["points"][-1]
    assert (last["atomic"], last["gross"]["atomic"], last["refunds"]["atomic"]) == ("2000", "12000", "10000")
    assert revenue["points"][-3]["atomic"] == "7000"  # 2000 + 5000 two hours ago
    assert revenue["total"] == {"atomic": "9000", "decimal": "0.009", "asset": ASSET}
    assert (revenue["gross"]["atomic"], revenue["refunds"]["atomic"]) == ("19000", "10000")
    assert len(week["revenue"]["points"]) == 7 and week["revenue"]["total"]["atomic"] == "14000"
    assert week["revenue"]["gross"]["atomic"] == "24000"
    order = tools["create_order"]
    assert (order["gross"]["atomic"], order["refunds"]["atomic"], order["net"]["atomic"]) == ("10000", "10000", "0")
    assert order["revenue"]["atomic"] == "0"
    assert data["totals"] == [{"asset": ASSET, "assetName": "USD Coin",
                               "gross": {"atomic": "24000", "decimal": "0.024", "asset": ASSET},
                               "refunds": {"atomic": "10000", "decimal": "0.01", "asset": ASSET},
                               "net": {"atomic": "14000", "decimal": "0.014", "asset": ASSET}}]


def test_paid_calls_show_on_the_dashboard(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    gateway = start_gateway(admin_token=TOKEN)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL")
        assert paid.status_code == 200
        data = client.get("/admin/data.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    quote = next(t for t in data["tools"] if t["tool"] == "get_quote")
    assert (quote["calls"], quote["settled"], quote["revenue"]["decimal"]) == (1, 1, "0.002")
    assert quote["sinceStart"]["challenges"] == 1 and quote["sinceStart"]["settled"] == 1
    assert data["topPayers"] == [{"payer": devchain.address(2), "payments": 1,
                                  "amount": {"atomic": "2000", "decimal": "0.002", "asset": devchain.token}}]
    assert data["revenue"]["points"][-1]["atomic"] == "2000"
