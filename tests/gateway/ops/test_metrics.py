"""Metrics: the funnel counters move as requests pass, per tool and reason, and each app has its own."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from catalog import Tool, load_catalogs
from gateway.devkit.payer import Payer
from gateway.ops.metrics import MAX_REASONS, GatewayMetrics
from gateway.pipeline.context import RequestContext
from gateway.settings import DEFAULT_CATALOG
from settlement.x402.codec import encode_header
from settlement.x402.wire import SettleResponse
from tests.conftest import Devchain, GatewayFactory, offer_of
from tests.e2e.test_paid_call import pay

TX = "0x" + "ab" * 32


def demo_tool(name: str = "get_quote") -> Tool:
    return next(t for t in load_catalogs([DEFAULT_CATALOG]).tools if t.name == name)


def finished(tool: Tool | None, outcome: str, reason: str | None = None, *, paid: bool = True,
             timings: dict[str, float] | None = None, upstream_status: int | None = None,
             settled: bool = False) -> RequestContext:
    ctx = RequestContext(method="GET", path="/x", query="", client=None, tool=tool, outcome=outcome, reason=reason)
    ctx.payment_received = paid
    ctx.timings = dict(timings or {})
    ctx.upstream_status = upstream_status
    if settled:
        ctx.settlement = SettleResponse(success=True, transaction=TX, network="eip155:31337")
    return ctx


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_funnel_outcomes_land_in_their_counters() -> None:
    metrics, tool = GatewayMetrics(), demo_tool()
    metrics.on_outcome(finished(tool, "challenged", "payment_required", paid=False))
    metrics.on_outcome(finished(tool, "received", "invalid_exact_evm_payload_signature"))
    metrics.on_outcome(finished(tool, "settled", timings={"verify": 0.01, "upstream": 0.02, "settle": 0.5},
                                upstream_status=200, settled=True))
    metrics.on_outcome(finished(tool, "upstream_error", timings={"verify": 0.01, "upstream": 0.02}, upstream_status=500))
    metrics.on_outcome(finished(tool, "upstream_failed", "upstream_timeout", timings={"verify": 0.01, "upstream": 10}))
    metrics.on_outcome(finished(tool, "settling", "settlement_pending", timings={"verify": 0.01, "upstream": 0.02,
                                                                                   "settle": 30}, upstream_status=200))
    metrics.on_outcome(finished(tool, "settling", "invalid_exact_evm_insufficient_funds",
                                timings={"verify": 0.01, "upstream": 0.02, "settle": 1}, upstream_status=200))
    metrics.on_outcome(finished(tool, "refunded", timings={"verify": 0.01, "settle": 1, "upstream": 0.1},
                                upstream_status=503, settled=True))
    metrics.on_outcome(finished(tool, "replayed"))
    metrics.on_outcome(finished(tool, "verified", "budget_exceeded", timings={"verify": 0.01}))
    metrics.on_outcome(finished(None, "received", "not_found", paid=False))

    q = {"tool": "get_quote"}
    assert value(metrics, "x402gw_challenges_total", **q) == 1
    assert value(metrics, "x402gw_payments_received_total", **q) == 9
    assert value(metrics, "x402gw_payments_rejected_total", reason="invalid_exact_evm_payload_signature", **q) == 1
    assert value(metrics, "x402gw_payments_replayed_total", **q) == 1
    assert value(metrics, "x402gw_payments_verified_total", **q) == 7
    assert value(metrics, "x402gw_payments_rejected_total", reason="budget_exceeded", **q) == 1
    assert value(metrics, "x402gw_upstream_calls_total", result="ok", **q) == 3
    assert value(metrics, "x402gw_upstream_calls_total", result="failed", **q) == 3
    assert value(metrics, "x402gw_settlements_total", result="settled", **q) == 2
    assert value(metrics, "x402gw_settlements_total", result="pending", **q) == 1
    assert value(metrics, "x402gw_settlements_total", result="failed", **q) == 1
    assert value(metrics, "x402gw_refunds_total", state="refunded", **q) == 1
    assert value(metrics, "x402gw_requests_total", outcome="received") == 2
    assert value(metrics, "x402gw_stage_seconds_count", stage="verify") == 7
    assert value(metrics, "x402gw_stage_seconds_count", stage="settle") == 4
    assert value(metrics, "x402gw_stage_seconds_bucket", stage="settle", le="30.0") == 4
    assert value(metrics, "x402gw_stage_seconds_bucket", stage="settle", le="10.0") == 3

    counts = metrics.per_tool()["get_quote"]
    assert (counts.challenges, counts.received, counts.verified, counts.rejected) == (1, 9, 7, 2)
    assert (counts.upstream_ok, counts.upstream_failed) == (3, 3)
    assert (counts.settled, counts.failed, counts.pending, counts.refunded) == (2, 1, 1, 1)


def test_reason_labels_stay_few_and_well_formed() -> None:
    metrics, tool = GatewayMetrics(), demo_tool()
    metrics.on_outcome(finished(tool, "received", "Weird Reason <from a remote facilitator>"))
    for i in range(MAX_REASONS + 10):
        metrics.on_outcome(finished(tool, "received", f"reason_{i}"))
    reasons = {
        sample.labels["reason"]
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "x402gw_payments_rejected_total"
    }
    assert len(reasons) == MAX_REASONS + 1  # the first MAX_REASONS codes, then "other"
    assert "other" in reasons


def test_each_instance_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.on_outcome(finished(demo_tool(), "challenged", paid=False))
    assert value(first, "x402gw_challenges_total", tool="get_quote") == 1
    assert value(second, "x402gw_challenges_total", tool="get_quote") == 0


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_counters_move_as_a_paid_call_passes(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    gateway = start_gateway()
    quote = (("tool", "get_quote"),)
    with gateway.client() as client:
        before = scrape(client)
        assert before.get(("x402gw_challenges_total", quote), 0) == 0
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL")
        assert paid.status_code == 200, paid.text
        # a bad signature: received, then rejected with the facilitator's reason
        payment = Payer(devchain.key(2)).sign(offer_of(client.get("/quotes/SAP")).accepts[0]).to_wire()
        sig = payment["payload"]["signature"]
        payment["payload"]["signature"] = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
        refused = client.get("/quotes/SAP", headers={"PAYMENT-SIGNATURE": encode_header(payment)})
        assert refused.status_code == 402
        after = scrape(client)

    assert after[("x402gw_challenges_total", quote)] == 2
    assert after[("x402gw_payments_received_total", quote)] == 2
    assert after[("x402gw_payments_verified_total", quote)] == 1
    rejected = (("reason", "invalid_exact_evm_payload_signature"), ("tool", "get_quote"))
    assert after[("x402gw_payments_rejected_total", rejected)] == 1
    assert after[("x402gw_upstream_calls_total", (("result", "ok"), ("tool", "get_quote")))] == 1
    assert after[("x402gw_settlements_total", (("result", "settled"), ("tool", "get_quote")))] == 1
    revenue = (("asset", devchain.token), ("tool", "get_quote"))
    assert after[("x402gw_revenue_atomic_total", revenue)] == 2000
    stages = {stage: after[("x402gw_stage_seconds_count", (("stage", stage),))] for stage in ("verify", "upstream", "settle")}
    # the bad signature is refused offline, before the facilitator's verify (no RPC spent on it)
    assert stages == {"verify": 1, "upstream": 1, "settle": 1}
    # a second app in the same process starts from zero
    other = start_gateway()
    with other.client() as client:
        assert scrape(client).get(("x402gw_challenges_total", quote), 0) == 0
