"""Budgets, rate limits and the circuit breaker across two gateway processes sharing Redis and
PostgreSQL, on a real anvil: the limits hold for the fleet, not per replica."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.devkit.payer import Payer
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    body_json,
    demo_catalog,
    offer_of,
    upstream_hits,
)
from tests.gateway.conftest import delete_prefixed, redis_test_prefix
from tests.support.processes import gateway_processes

REDIS_URL = "redis://127.0.0.1:6379/0"
GAS_KEY_ACCOUNT = 8  # the second replica pays gas from its own account: no tx-nonce races


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = redis_test_prefix()
    try:
        yield prefix
    finally:
        delete_prefixed(prefix)


def replica_envs(devchain: Devchain, catalog: Path, database_url: str, prefix: str, **extra: str) -> list[dict[str, str]]:
    env = {
        "X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
        "X402GW_DATABASE_URL": database_url, "X402GW_REDIS_URL": REDIS_URL, "X402GW_REDIS_PREFIX": prefix,
        **extra,
    }
    return [env, {**env, "X402GW_SETTLEMENT_KEY": devchain.key(GAS_KEY_ACCOUNT)}]


def sign_for(url: str, devchain: Devchain, payer: int, path: str) -> str:
    offer = offer_of(httpx.get(f"{url}{path}", timeout=30))
    return encode_header(Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource))


def all_at_once(calls: list[tuple[str, str]], sources: list[str] | None = None) -> list[httpx.Response]:
    """GET each (url, payment header) at the same moment, one thread each (from ``sources[i]``, a
    loopback address, when given: per-client buckets are per address)."""
    barrier = threading.Barrier(len(calls))

    def call(index: int) -> httpx.Response:
        url, header = calls[index]
        source = sources[index] if sources else None
        transport = httpx.HTTPTransport(local_address=source) if source else None
        with httpx.Client(transport=transport, timeout=60) as client:
            barrier.wait()
            return client.get(url, headers={"PAYMENT-SIGNATURE": header} if header else {})

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, range(len(calls))))


def settled_for(ledger: Ledger, payer: str, prefix: str) -> list[int]:
    return [r.amount for r in ledger.all() if r.payer == payer and r.path.startswith(prefix) and r.state == PaymentState.SETTLED]


def test_a_budget_holds_across_two_replicas_under_concurrency(
    devchain: Devchain, upstream: str, tmp_path: Path, postgres_database: str, redis_prefix: str
) -> None:
    """Budget 0.010 per payer per day, calls of 0.002, eight at once over two replicas: exactly
    five are served and charged, three are refused with budget_exceeded, and so is the next."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text().replace(
        "\nupstreams:", '\nbudgets:\n  per_payer: {amount: "0.010", window: 1d}\n\nupstreams:', 1))
    payer = 4
    address = devchain.address(payer)
    ledger = open_ledger(postgres_database)
    before = devchain.balance(PAY_TO)
    with gateway_processes(replica_envs(devchain, catalog, postgres_database, redis_prefix), tmp_path) as replicas:
        one, two = replicas
        paths = [f"/quotes/BUD{chr(65 + i)}" for i in range(8)]
        calls = [
            (f"{(one, two)[i % 2].url}{path}", sign_for(one.url, devchain, payer, path)) for i, path in enumerate(paths)
        ]
        responses = all_at_once(calls)
        later = sign_for(two.url, devchain, payer, "/quotes/BUDZ")
        after = httpx.get(f"{two.url}/quotes/BUDZ", headers={"PAYMENT-SIGNATURE": later}, timeout=30)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 403]
    assert (len(served), len(refused)) == (5, 3), [r.text for r in responses]
    for response in [*refused, after]:
        body = body_json(response)
        assert body["error"] == "budget_exceeded" and body["budget"] == "per_payer"
        assert (body["limit"], body["limitAtomic"]) == ("0.01", "10000")
        assert body["resetsAt"].endswith("T00:00:00Z")
        assert "payment-response" not in response.headers
    assert after.status_code == 403 and body_json(after)["used"] == "0.01"
    assert devchain.balance(PAY_TO) - before == 10_000
    assert settled_for(ledger, address, "/quotes/BUD") == [2000] * 5
    for (url, _), response in zip(calls, responses, strict=True):
        symbol = url.rsplit("/", 1)[1]
        assert upstream_hits(upstream, f"GET /api/v1/quote/{symbol}") == (1 if response.status_code == 200 else 0)
    ledger.close()


def test_rate_limits_hold_across_two_replicas(
    devchain: Devchain, upstream: str, tmp_path: Path, postgres_database: str, redis_prefix: str
) -> None:
    """Unpaid requests per client address (3 per hour), then paid requests per payer (2 per hour):
    the buckets are shared, so the fleet allows exactly that many, with Retry-After on the rest."""
    catalog = demo_catalog(tmp_path, upstream)
    envs = replica_envs(devchain, catalog, postgres_database, redis_prefix,
                        X402GW_RATE_LIMIT_PER_CLIENT="3/1h", X402GW_RATE_LIMIT_PER_PAYER="2/1h")
    payer = 5
    before = devchain.balance(PAY_TO)
    with gateway_processes(envs, tmp_path) as replicas:
        one, two = replicas
        unpaid = all_at_once([(f"{(one, two)[i % 2].url}/weather?city=Rome", "") for i in range(8)])
        # 127.0.0.1 has spent its bucket; the offers are read from two other loopback addresses
        headers = [sign_from(f"127.0.0.{2 + i // 2}", one.url, devchain, payer, f"/quotes/RL{chr(65 + i)}") for i in range(4)]
        # paid requests spend per-client tokens too (a payment header is no pass): from a fresh address
        paid = all_at_once([(f"{(one, two)[i % 2].url}/quotes/RL{chr(65 + i)}", h) for i, h in enumerate(headers)],
                           sources=[f"127.0.0.{9 + i}" for i in range(4)])
    assert sorted(r.status_code for r in unpaid) == [402] * 3 + [429] * 5
    for limited in (r for r in unpaid if r.status_code == 429):
        assert body_json(limited)["error"] == "rate_limited" and body_json(limited)["limit"] == "per_client"
        assert int(limited.headers["retry-after"]) >= 1 and body_json(limited)["retryAfter"] >= 1
    assert sorted(r.status_code for r in paid) == [200, 200, 429, 429], [r.text for r in paid]
    for limited in (r for r in paid if r.status_code == 429):
        assert body_json(limited)["limit"] == "per_payer" and "retry-after" in limited.headers
    assert devchain.balance(PAY_TO) - before == 2 * 2000


def sign_from(source: str, url: str, devchain: Devchain, payer: int, path: str) -> str:
    """Ask for the offer from another loopback address: per-client buckets are per address."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        offer = offer_of(client.get(f"{url}{path}"))
    return encode_header(Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource))


def test_a_breaker_opened_on_one_replica_stops_offers_on_the_other(
    devchain: Devchain, upstream: str, tmp_path: Path, postgres_database: str, redis_prefix: str
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text().replace(
        "    timeout_seconds: 10\n",
        "    timeout_seconds: 10\n    breaker: {failures: 2, window_seconds: 86400, cooldown_seconds: 600}\n", 1))
    before = devchain.balance(PAY_TO)
    with gateway_processes(replica_envs(devchain, catalog, postgres_database, redis_prefix), tmp_path) as replicas:
        one, two = replicas
        for _ in range(2):
            header = sign_for(one.url, devchain, 6, "/reports/500")
            failed = httpx.get(f"{one.url}/reports/500", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
            assert failed.status_code == 500
        refused = [httpx.get(f"{r.url}{path}", timeout=30) for r in (one, two) for path in ("/reports/42", "/quotes/BRK")]
    for response in refused:
        assert response.status_code == 503, response.text
        assert body_json(response)["error"] == "upstream_circuit_open"
        assert "payment-required" not in response.headers
        assert 1 <= int(response.headers["retry-after"]) <= 600
    assert upstream_hits(upstream, "GET /reports/500") == 2
    assert devchain.balance(PAY_TO) == before

