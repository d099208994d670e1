"""Two gateway replicas (own processes, one Redis, one PostgreSQL ledger) taking concurrent calls on
one batch-settlement channel never over-claim: each voucher raced on both replicas is charged once,
two consecutive vouchers sent at the same time to different replicas are taken in order (the later
one is refused until the earlier is accepted, then taken), and after the claims (by count on both
replicas, the rest at a restart) the escrow's claimed total, the payee's gain and the ledger's
settled sum are all the highest accepted cumulative amount."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_contract import ESCROW_ADDRESS, decode_channel_state
from tests.conftest import PAY_TO, Devchain, fresh_redis_prefix
from tests.e2e.test_channel_attacks import _header, _voucher
from tests.e2e.test_channel_paid_calls import CATALOG, PRICE, pay_calls, sdk_client, upstream_calls
from tests.support.processes import gateway_processes

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/0"
PAYER = 8


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with fresh_redis_prefix("test") as prefix:
        yield prefix


def test_two_replicas_on_one_channel_never_over_claim(
    devchain: Devchain, upstream: str, tmp_path: Path, postgres_database: str, redis_prefix: str,
) -> None:
    catalog = tmp_path / "channels.yaml"
    catalog.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=upstream))
    env = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
           "X402GW_DATABASE_URL": postgres_database, "X402GW_REDIS_URL": REDIS_URL,
           "X402GW_REDIS_PREFIX": redis_prefix, "X402GW_CHANNEL_CLAIM_EVERY_CALLS": "5",
           "X402GW_CHANNEL_CLAIM_EVERY_SECONDS": "600"}
    ledger = open_ledger(postgres_database)
    before = (devchain.balance(PAY_TO), upstream_calls(upstream))
    fresh: list[httpx.Response] = []
    with gateway_processes([env, env], tmp_path) as [one, two]:
        assert asyncio.run(pay_calls(one.url, sdk_client(devchain, PAYER, "0x" + "e9" * 32), 1)) == [200]  # the deposit
        [opened] = [p for p in map(row_payment, ledger.all()) if p is not None and p.payer == devchain.address(PAYER)]
        with httpx.Client(timeout=30) as http:
            required = json.loads(base64.b64decode(http.get(f"{one.url}/quotes/ACME").headers["PAYMENT-REQUIRED"]))

        def header(k: int) -> str:
            return _header(required, _voucher(devchain, PAYER, opened, k * PRICE))

        def race(pairs: list[tuple[str, str]]) -> list[httpx.Response]:
            barrier = threading.Barrier(len(pairs))

            def send(pair: tuple[str, str]) -> httpx.Response:
                barrier.wait()
                return httpx.get(f"{pair[0]}/quotes/ACME", headers={"PAYMENT-SIGNATURE": pair[1]}, timeout=30)

            with ThreadPoolExecutor(len(pairs)) as pool:
                return list(pool.map(send, pairs))

        for k in range(2, 12):  # one voucher raced on both replicas: charged once
            answers = race([(one.url, header(k)), (two.url, header(k))])
            new = [r for r in answers if r.status_code == 200 and "x402gw-replay" not in r.headers]
            assert len(new) == 1, [(r.status_code, r.text[:200]) for r in answers]
            assert all(r.status_code in (200, 409, 503) for r in answers)  # the other: replay, in flight or not final yet
            fresh.extend(new)
        for k in range(12, 22, 2):  # consecutive vouchers at once on different replicas: taken in order
            answers = race([(one.url, header(k)), (two.url, header(k + 1))])
            fresh.extend(r for r in answers if r.status_code == 200)
            if answers[1].status_code != 200:  # arrived first: refused until k was accepted
                assert answers[1].json()["error"] in ("invalid_batch_settlement_evm_cumulative_amount_mismatch",
                                                      "invalid_batch_settlement_evm_channel_busy"), answers[1].text
                again = httpx.get(f"{two.url}/quotes/ACME", headers={"PAYMENT-SIGNATURE": header(k + 1)}, timeout=30)
                assert again.status_code == 200, again.text
                fresh.append(again)
    with gateway_processes([env], tmp_path):
        pass  # a restart claims whatever is still accrued
    rows = [r for r in ledger.all() if (p := row_payment(r)) is not None and p.channel_id == opened.channel_id]
    assert len(fresh) == 20 and len(rows) == 21 and {r.state for r in rows} == {PaymentState.SETTLED}
    assert sorted(p.max_claimable for p in map(row_payment, rows) if p is not None) == [k * PRICE for k in range(1, 22)]
    channels, pending = opened.state_calls()
    balance, claimed, _ = decode_channel_state(devchain.w3.eth.call({"to": ESCROW_ADDRESS, "data": channels}),
                                               devchain.w3.eth.call({"to": ESCROW_ADDRESS, "data": pending}))
    earned = devchain.balance(PAY_TO) - before[0]
    assert claimed == earned == sum(r.amount for r in rows) == 21 * PRICE <= balance
    assert upstream_calls(upstream) - before[1] == 21  # a refused voucher never reached the upstream
    ledger.close()
