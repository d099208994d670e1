"""Attacks across replicas (issue 13): two gateway processes sharing Redis (own key prefix) and a
PostgreSQL ledger. A payment settled on one replica is public: a forged header naming its (payer,
nonce) gets nothing on either replica, the genuine payload re-targeted gets nothing, and one fresh
payment raced on both replicas is answered and charged once. The shared invariant checker reads
the same ledger and chain."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from settlement.ledger import Ledger
from settlement.schema import open_ledger
from tests.conftest import PAY_TO
from tests.support.attack_stack import (
    REDIS_URL,
    Stack,
    attack_stack,
    error_of,
    forged,
    offer_for,
    sign,
    v1_header,
    v2_header,
)
from tests.support.invariant import InvariantChecker
from tests.support.processes import GatewayProcess

PAYER = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with attack_stack(tmp_path_factory.mktemp("replicas")) as built:
        yield built


@pytest.fixture
def replicas(stack: Stack, postgres_database: str, tmp_path: Path) -> Iterator[tuple[list[GatewayProcess], Ledger]]:
    env = {
        "X402GW_CATALOG": str(stack.catalog_path),
        "X402GW_DEPLOYMENT_FILE": str(stack.deployment_file),
        "X402GW_DATABASE_URL": postgres_database,
        "X402GW_REDIS_URL": REDIS_URL,
        "X402GW_REDIS_PREFIX": stack.redis_prefix,
        "X402GW_RECEIPT_TIMEOUT_SECONDS": "10",
    }
    ledger = open_ledger(postgres_database)
    processes = [GatewayProcess(env, tmp_path, tmp_path / f"gateway{i}.log") for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # start both at once: start-up is mostly imports
            list(pool.map(lambda process: process.start(), processes))
        yield processes, ledger
    finally:
        for process in processes:
            process.stop()
        ledger.close()


def test_public_payment_facts_get_nothing_on_any_replica_and_a_race_charges_once(
    stack: Stack, replicas: tuple[list[GatewayProcess], Ledger]
) -> None:
    (one, two), ledger = replicas
    checker = InvariantChecker(chain=stack.chain, ledger=ledger, upstream=stack.upstream, catalogs=stack.catalogs,
                               pay_to=PAY_TO)
    key = stack.chain.key(PAYER)
    payee_before = stack.chain.balance(PAY_TO)
    with httpx.Client(base_url=one.url, timeout=60) as a, httpx.Client(base_url=two.url, timeout=60) as b:
        offer = offer_for(a, "GET", "/q/REPL")
        payment = sign(key, offer)
        paid = checker.send(a, "GET", "/q/REPL", headers=v2_header(payment), label="honest on replica one")
        assert paid.status_code == 200, paid.text
        auth = payment.payload["authorization"]
        for client in (a, b):
            for path in ("/q/REPL", "/q2/REPL"):
                target = offer_for(client, "GET", path)
                fake = forged(target.accepts[0], target, auth["from"], auth["nonce"])
                v1 = {k: v for k, v in fake.items() if k not in ("accepted", "resource")}
                v1.update(x402Version=1, scheme="exact", network=target.accepts[0].network)
                for headers in (v2_header(fake), v1_header(v1)):
                    response = checker.send(client, "GET", path, headers=headers, label="forged on a replica")
                    assert response.status_code == 402, response.text
                    assert error_of(response) == "invalid_exact_evm_payload_signature", response.text
                    assert "x402gw-replay" not in response.headers
            retargeted = checker.send(client, "GET", "/q/OTHER", headers=v2_header(payment), label="retargeted")
            assert retargeted.status_code in (402, 409), retargeted.text
        same = checker.send(b, "GET", "/q/REPL", headers=v2_header(payment), label="same payment, other replica")
        assert same.status_code in (200, 409), same.text
        if same.status_code == 200:
            assert same.headers.get("x402gw-replay") == "true" and same.content == paid.content
        # one fresh payment raced on both replicas
        racing = sign(key, offer_for(a, "GET", "/q/RACE"))
        urls = [one.url, two.url] * 3

        def call(url: str) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as client:
                return checker.send(client, "GET", "/q/RACE", headers=v2_header(racing), label="race")

        with ThreadPoolExecutor(len(urls)) as pool:
            responses = list(pool.map(call, urls))
    fresh = [r for r in responses if r.status_code == 200 and "x402gw-replay" not in r.headers]
    assert len(fresh) == 1, [(r.status_code, r.text[:100]) for r in responses]
    assert all(r.status_code in (200, 409) for r in responses), [(r.status_code, r.text[:100]) for r in responses]
    assert stack.upstream.count("read_quote", checker.upstream_since) == 2
    assert stack.chain.balance(PAY_TO) == payee_before + 4000
    checker.check()
