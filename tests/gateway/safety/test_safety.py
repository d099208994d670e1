"""The safety stage's rules one by one: limits syntax, header size, kill switches, payer lists,
price guard, rate limits and budgets, on the memory store with a fake clock (and Redis where the
rule is a shared counter). The end-to-end versions are in tests/e2e/test_safety*.py."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from catalog import CatalogError, Catalogs, Tool, load_catalogs, parse_catalog
from catalog.limits import parse_budget, parse_rate_limit, parse_window
from catalog.loader import price_ceiling_issues
from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.safety.checks import Limits, Safety
from gateway.safety.policy import Policy, parse_policy, policy_routes
from gateway.settings import Settings
from gateway.store import MemoryStore, StateStore
from settlement.ledger import PaymentState
from tests.gateway.conftest import FakeClock, StoreBackend

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
OTHER = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"

# Line numbers of this text are asserted: keep its layout.
CATALOG = """\
catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  legacy:
    base_url: "http://127.0.0.1:9"
max_price: "0.05"
budgets:
  per_payer: {amount: "0.010", window: 1d}
  per_owner: {amount: "1", window: 1h}
rate_limits:
  per_client: {requests: 2, window: 10s}
tools:
  - name: quote
    description: Q
    method: GET
    path: /q
    price: "0.002"
    max_price: "0.004"
    budgets:
      per_payer_per_tool: {amount: "0.004", window: 1d}
    rate_limits:
      per_payer: {requests: 3, window: 1m, burst: 3}
  - name: weather
    description: W
    method: GET
    path: /w
    price: "0.003"
"""


def catalogs(text: str = CATALOG) -> Catalogs:
    return Catalogs(catalogs=(parse_catalog(text),))


def ctx(client: str = "10.0.0.1") -> RequestContext:
    return RequestContext(method="GET", path="/q", query="", client=client)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@dataclass
class FakeRow:
    state: str


class FakeLedger:
    def __init__(self, state: str) -> None:
        self.state = state

    def get(self, payment_id: int) -> FakeRow:
        return FakeRow(self.state)


# -- syntax -------------------------------------------------------------------------------------


def test_limit_syntax_in_settings_and_catalog() -> None:
    assert parse_window("1d") == 86_400 and parse_window("30s") == 30 and parse_window(90) == 90
    for bad in ("0s", "1y", "", True, "-1h"):
        with pytest.raises(ValueError):
            parse_window(bad)
    budget = parse_budget("5.00/1d")
    assert (budget.amount, budget.window) == (Decimal("5.00"), 86_400)
    rate = parse_rate_limit("60/1m:120")
    assert (rate.rate_per_second, rate.capacity) == (1.0, 120)
    with pytest.raises(ValueError):
        parse_budget("5.00")
    settings = Settings(budget_per_payer="0.5/1h", rate_limit_per_client="10/1s", max_price="0.1", max_header_bytes=4096)
    limits = Limits.from_settings(settings)
    assert limits.budgets.per_payer is not None and limits.budgets.per_payer.window == 3600
    assert limits.rate_limits.per_client is not None and limits.rate_limits.per_client.requests == 10
    assert limits.max_price == Decimal("0.1") and limits.max_header_bytes == 4096
    loaded = parse_catalog(CATALOG)
    assert loaded.budgets.per_payer is not None and loaded.tools[0].budgets.per_payer_per_tool is not None
    assert loaded.tools[0].rate_limits.per_payer is not None and loaded.tools[0].max_price == Decimal("0.004")


def test_price_above_the_tool_or_catalog_maximum_is_refused_at_load_with_its_line() -> None:
    with pytest.raises(CatalogError) as refused:
        parse_catalog(CATALOG.replace('price: "0.002"', 'price: "0.005"'))
    [issue] = refused.value.issues
    assert (issue.code, issue.path, issue.line) == ("price_above_max", "tools[0].price", 24)
    with pytest.raises(CatalogError) as catalog_wide:
        parse_catalog(CATALOG.replace('price: "0.003"', 'price: "0.06"'))
    assert [(i.code, i.path) for i in catalog_wide.value.issues] == [("price_above_max", "tools[1].price")]


def test_gateway_wide_price_ceiling_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CATALOG)
    [issue] = price_ceiling_issues(load_catalogs([path]), Decimal("0.0025"))
    assert (issue.path, issue.line, issue.code) == ("tools[1].price", 34, "price_above_max")
    assert "X402GW_MAX_PRICE" in issue.message


def test_a_budget_the_token_cannot_express_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="decimals"):
        Safety(MemoryStore(), catalogs(), Limits(budgets=Limits().budgets.model_copy(update={"per_payer": parse_budget("0.0000001/1d")})))


# -- before the 402 -----------------------------------------------------------------------------


def test_request_headers_over_the_limit_get_431() -> None:
    safety = Safety(MemoryStore(), catalogs(), Limits(max_header_bytes=100))
    safety.check_headers([(b"host", b"x" * 40)])
    with pytest.raises(GatewayError) as refused:
        safety.check_headers([(b"host", b"x" * 40), (b"cookie", b"y" * 60)])
    assert (refused.value.status, refused.value.code) == (431, "request_headers_too_large")


def test_kill_switch_from_a_policy_file_takes_effect_when_the_file_changes(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("disabled_tools: []\n")
    store = MemoryStore()
    safety = Safety(store, catalogs(), policy=Policy(store, policy_file))
    tool = safety_tool(safety, "quote")

    async def body() -> None:
        await safety.before_challenge(ctx(), tool, 2000)
        policy_file.write_text('disabled_tools: {quote: "maintenance"}\n')
        os.utime(policy_file, ns=(1, 2_000_000_000))  # a distinct mtime, however fast the write
        with pytest.raises(GatewayError) as refused:
            await safety.before_challenge(ctx(), tool, 2000)
        assert (refused.value.status, refused.value.code) == (503, "tool_disabled")
        assert refused.value.fields["retryable"] is False and "maintenance" in refused.value.message
        assert "PAYMENT-REQUIRED" not in refused.value.to_response().headers
        # a broken file keeps the last good policy in force
        policy_file.write_text("disabled_tools: [\n")
        os.utime(policy_file, ns=(1, 3_000_000_000))
        with pytest.raises(GatewayError):
            await safety.before_challenge(ctx(), tool, 2000)
        policy_file.write_text("disabled_owners: [acme]\n")
        os.utime(policy_file, ns=(1, 4_000_000_000))
        with pytest.raises(GatewayError) as owner_off:
            await safety.before_challenge(ctx(), safety_tool(safety, "weather"), 3000)
        assert owner_off.value.code == "tool_disabled"
        policy_file.unlink()
        await safety.before_challenge(ctx(), tool, 2000)

    run(body())


def test_policy_file_is_validated() -> None:
    assert parse_policy("").allowed_payers is None
    for bad in ("deny_payers: [not-an-address]\n", "surprise: 1\n", "- a\n", "disabled_tools: 3\n"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_payer_deny_and_allow_lists(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(f'{{"deny_payers": ["{PAYER.lower()}"]}}')
    store = MemoryStore()
    safety = Safety(store, catalogs(), policy=Policy(store, policy_file))
    tool = safety_tool(safety, "weather")

    async def body() -> None:
        with pytest.raises(GatewayError) as denied:
            await safety.before_verify(ctx(), tool, PAYER)
        assert (denied.value.status, denied.value.code) == (403, "payer_denied")
        await safety.before_verify(ctx(), tool, OTHER)
        policy_file.write_text(f'{{"allow_payers": ["{PAYER}"]}}')
        os.utime(policy_file, ns=(1, 2_000_000_000))
        await safety.before_verify(ctx(), tool, PAYER)
        with pytest.raises(GatewayError) as not_listed:
            await safety.before_verify(ctx(), tool, OTHER)
        assert not_listed.value.code == "payer_denied"

    run(body())


def test_price_guard_refuses_a_price_above_the_maximum_at_request_time() -> None:
    safety = Safety(MemoryStore(), catalogs(), Limits(max_price=Decimal("0.0025")))

    async def body() -> None:
        await safety.before_challenge(ctx(), safety_tool(safety, "quote"), 2000)
        # a price computed at request time above the tool's own max_price (0.004) ...
        with pytest.raises(GatewayError) as refused:
            await safety.before_challenge(ctx(), safety_tool(safety, "quote"), 4001)
        assert (refused.value.status, refused.value.code) == (503, "price_guard")
        # ... or above the gateway's
        with pytest.raises(GatewayError):
            await safety.before_challenge(ctx(), safety_tool(safety, "weather"), 3000)

    run(body())


def test_admin_endpoints_switch_tools_and_payers_for_every_replica() -> None:
    store = MemoryStore()
    policies = [Policy(store), Policy(store)]  # two replicas on one store
    app = Starlette(routes=policy_routes(policies[0], "s3cret", ["quote", "weather"], ["acme"]))
    with TestClient(app) as client:
        assert client.post("/admin/kill-switch", json={"tool": "quote", "disabled": True}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/admin/kill-switch", headers={"Authorization": "Bearer nope"},
                           json={"tool": "quote", "disabled": True}).status_code == 401
        assert client.post("/admin/kill-switch", headers=auth, json={"tool": "nope", "disabled": True}).status_code == 404
        assert client.post("/admin/kill-switch", headers=auth, json={"tool": "quote"}).status_code == 422
        ok = client.post("/admin/kill-switch", headers=auth, json={"tool": "quote", "disabled": True, "reason": "incident"})
        assert ok.status_code == 200, ok.text
        assert client.post("/admin/payers", headers=auth, json={"payer": PAYER, "denied": True}).status_code == 200
        view = run(policies[1].current())
        assert view.tool_disabled("quote", "acme") == "incident" and view.payer_refused(PAYER)
        listed = client.get("/admin/kill-switch", headers=auth).json()
        assert "quote" in listed["disabledTools"] and PAYER.lower() in listed["deniedPayers"]
        client.post("/admin/kill-switch", headers=auth, json={"tool": "quote", "disabled": False})
        client.post("/admin/payers", headers=auth, json={"payer": PAYER, "denied": False})
    view = run(policies[1].current())
    assert view.tool_disabled("quote", "acme") is None and view.payer_refused(PAYER) is None


# -- rate limits --------------------------------------------------------------------------------


def test_unpaid_requests_are_rate_limited_per_client_address_and_refill() -> None:
    clock = FakeClock()
    safety = Safety(MemoryStore(clock=clock, wall_clock=clock), catalogs())  # per_client 2 per 10s
    tool = safety_tool(safety, "quote")

    async def body() -> None:
        await safety.per_client(ctx("10.0.0.1"), tool)
        await safety.per_client(ctx("10.0.0.1"), tool)
        with pytest.raises(GatewayError) as limited:
            await safety.per_client(ctx("10.0.0.1"), tool)
        assert (limited.value.status, limited.value.code, limited.value.fields["retryAfter"]) == (429, "rate_limited", 5)
        assert limited.value.to_response().headers["retry-after"] == "5"
        await safety.per_client(ctx("10.0.0.2"), tool)  # another client has its own bucket
        clock.advance(5)
        await safety.per_client(ctx("10.0.0.1"), tool)

    run(body())


def test_paid_requests_are_rate_limited_per_payer_and_per_tool(store_backend: StoreBackend) -> None:
    limits = Limits(rate_limits=Limits().rate_limits.model_copy(update={"per_tool": parse_rate_limit("4/1h")}))

    async def body(store: StateStore) -> None:
        safety = Safety(store, catalogs(), limits)
        quote = safety_tool(safety, "quote")  # per payer: 3 per minute
        for _ in range(5):  # before verify: lists only, no tokens (a replayed settled signature spends none)
            await safety.before_verify(ctx(), quote, PAYER, per_payer=False)
        for _ in range(3):
            await safety.per_tool(ctx(), quote, PAYER)
        with pytest.raises(GatewayError) as per_payer:
            await safety.per_tool(ctx(), quote, PAYER)
        assert per_payer.value.code == "rate_limited" and per_payer.value.fields["limit"] == "per_payer"
        assert per_payer.value.fields["retryAfter"] >= 1
        await safety.per_tool(ctx(), quote, OTHER)  # the tool's 4th
        with pytest.raises(GatewayError) as per_tool:
            await safety.per_tool(ctx(), quote, "0x90F79bf6EB2c4f870365E785982E1f101E93b906")
        assert per_tool.value.fields["limit"] == "per_tool"
        with pytest.raises(GatewayError) as sign_in:  # a sign-in takes its payer's tokens before the lookup
            await safety.before_verify(ctx(), quote, PAYER)
        assert sign_in.value.fields["limit"] == "per_payer"

    store_backend.run(body)


# -- budgets ------------------------------------------------------------------------------------


def test_budget_reserves_up_to_the_limit_then_refuses_with_limit_used_and_reset(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        safety = Safety(store, catalogs())
        weather = safety_tool(safety, "weather")  # catalog per_payer 0.010 per day
        settled = FakeLedger(PaymentState.SETTLED)
        for _ in range(3):
            request = settled_ctx()
            await safety.reserve(request, weather, PAYER, 3000)
            await safety.finish(request, settled)  # kept: the money moved
        with pytest.raises(GatewayError) as over:
            await safety.reserve(settled_ctx(), weather, PAYER, 3000)
        fields = over.value.fields
        assert (over.value.status, over.value.code) == (403, "budget_exceeded")
        assert (fields["budget"], fields["limit"], fields["limitAtomic"], fields["used"], fields["usedAtomic"]) == (
            "per_payer", "0.01", "10000", "0.009", "9000")
        assert fields["resetsAt"].endswith("T00:00:00Z")
        await safety.reserve(settled_ctx(), weather, OTHER, 3000)  # another payer has its own budget
        await safety.reserve(settled_ctx(), weather, PAYER, 1000)  # what is left still fits

    store_backend.run(body)


def test_a_reservation_is_released_when_nothing_was_settled(store_backend: StoreBackend) -> None:
    async def body(store: StateStore) -> None:
        safety = Safety(store, catalogs())
        quote = safety_tool(safety, "quote")  # per payer per tool: 0.004 per day
        for outcome, state in (("upstream_error", PaymentState.VOIDED), ("settling", PaymentState.FAILED),
                               ("verified", PaymentState.VERIFIED)):
            request = settled_ctx()
            await safety.reserve(request, quote, PAYER, 2000)
            request.outcome = outcome
            await safety.finish(request, FakeLedger(state))
        for _ in range(2):  # the whole 0.004 is still there
            request = settled_ctx()
            await safety.reserve(request, quote, PAYER, 2000)
            await safety.finish(request, FakeLedger(PaymentState.PENDING))  # pending: kept
        with pytest.raises(GatewayError) as over:
            await safety.reserve(settled_ctx(), quote, PAYER, 2000)
        assert over.value.fields["budget"] == "per_payer_per_tool"

    store_backend.run(body)


def test_a_refusal_by_one_budget_gives_back_the_others() -> None:
    async def body() -> None:
        store = MemoryStore()
        safety = Safety(store, catalogs())
        quote = safety_tool(safety, "quote")
        request = settled_ctx()
        await safety.reserve(request, quote, PAYER, 4000)  # fills per_payer_per_tool (0.004)
        await safety.finish(request, FakeLedger(PaymentState.SETTLED))
        with pytest.raises(GatewayError):
            await safety.reserve(settled_ctx(), quote, PAYER, 2000)
        # per_payer (0.010) was reserved before per_payer_per_tool refused, and given back:
        weather = safety_tool(safety, "weather")
        await safety.reserve(settled_ctx(), weather, PAYER, 6000)

    run(body())


def settled_ctx() -> RequestContext:
    request = ctx()
    request.outcome, request.payment_id = "settled", 1
    return request


def safety_tool(safety: Safety, name: str) -> Tool:
    return catalogs().tool(name)
