"""Attacks on verify's balance read standing in for a settlement's own (``InFlight.saw_balance``,
``_estimate``; settlement.schemes.exact_guards). Real stack: a private anvil, a recording upstream,
an in-process gateway (memory store: the estimate's path). Asserted on chain (payer, payee, the
settlement account's transactions and their receipts), in the ledger and in the upstream's log."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from catalog import load_catalogs
from gateway.app import create_app
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from settlement.schemes import exact_guards
from tests.conftest import PAY_TO, Devchain, running_devchain
from tests.e2e.test_attacks_channel_payers import _client as channel_client
from tests.e2e.test_attacks_gas import fresh_payer, known, pay_header, settler
from tests.e2e.test_channel_paid_calls import pay_calls
from tests.support.recording_upstream import MARKER_PREFIX, RecordingUpstream

pytestmark = pytest.mark.e2e

PRICE = 2000  # read_a, read_b (settle after the upstream)
CHANNEL_PRICE = 1000  # channel_quote; a deposit of 10 prices is the floor
CATALOG = """
catalog: 1
owner: review-balance
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 300
upstreams:
  rec: {{base_url: "{upstream}", timeout_seconds: 30}}
tools:
  - {{name: read_a, description: a paid read, method: GET, path: "/a/{{item}}", upstream: rec,
      upstream_path: "/u/read_a/{{item}}", price: "0.002"}}
  - {{name: read_b, description: a paid read, method: GET, path: "/b/{{item}}", upstream: rec,
      upstream_path: "/u/read_b/{{item}}", price: "0.002"}}
  - {{name: channel_quote, description: paid from a channel, method: GET, path: "/quotes/{{symbol}}", upstream: rec,
      upstream_path: "/u/channel_quote/{{symbol}}", price: "0.001", payment: {{scheme: batch-settlement}}}}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("balance-reuse")) as private:
        yield private


@pytest.fixture(scope="module")
def rec() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def gateway(chain: Devchain, rec: RecordingUpstream, tmp_path: Path) -> Iterator[tuple[str, Ledger]]:
    path = tmp_path / "review.yaml"
    path.write_text(CATALOG.format(token=chain.token, pay_to=PAY_TO, upstream=rec.url))
    settings = Settings(catalog=[path], deployment_file=chain.deployment_file, receipt_timeout_seconds=1,
                        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
                        channel_claim_every_calls=1000, channel_claim_every_seconds=600)
    ledger = open_ledger(settings.database_url)
    server = ThreadServer(create_app(settings, catalogs=load_catalogs([path]), ledger=ledger)).start()
    yield server.url, ledger
    server.stop()
    ledger.close()


def automine(chain: Devchain, on: bool) -> None:
    chain.w3.provider.make_request("evm_setAutomine", [on])  # type: ignore[arg-type]


def settler_statuses(chain: Devchain, start: int) -> list[int]:
    """The receipt status of every transaction the settlement account sent in blocks after ``start``."""
    me, found = settler(chain).lower(), []
    for number in range(start + 1, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if str(tx["from"]).lower() == me:
                found.append(chain.w3.eth.get_transaction_receipt(tx["hash"])["status"])
    return found


@pytest.mark.parametrize("drain", ["exact-payment", "channel-deposit", "channel-deposit-read-as-before"])
def test_a_payer_drained_through_the_gateway_while_its_upstream_runs_buys_no_reverted_settlement(
    chain: Devchain, rec: RecordingUpstream, gateway: tuple[str, Ledger], drain: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The payer keeps one exact settlement (A) held past its receipt wait (outcome unknown, then mined),
    pays B (verify reads its balance), and while B's upstream runs spends through this same gateway
    all but half of B's price: another exact payment (its hold given back: the estimate takes it off),
    or a channel deposit, which the gateway sends itself (``channels_policy.make_deposit``). The review
    found the deposit outside every hold: nothing given back, B's hold (A + B <= verify's read) took no
    read of its own, was broadcast and reverted on our gas. Correct, and now so: the deposit is
    spending in flight (``InFlight.spending``), given back when it ends, so B's estimate falls short,
    the balance is read and B refused, nothing sent: 402, B's content withheld, no revert; as the old
    path (``read-as-before``: no estimate) does."""
    if drain.endswith("read-as-before"):
        monkeypatch.setattr(exact_guards, "BALANCE_REUSE_SECONDS", -1.0)
    url, ledger = gateway
    spend = PRICE if drain == "exact-payment" else 10 * CHANNEL_PRICE
    key = fresh_payer(chain, spend + PRICE + PRICE // 2)  # after A and the drain: half of B's price
    payer = Account.from_key(key).address
    with httpx.Client(base_url=url, timeout=60) as client:
        header_a, header_b, header_c = (pay_header(client, key, path) for path in ("/a/1", "/b/1", "/a/2"))
        start, pay_to_before = chain.w3.eth.block_number, chain.balance(PAY_TO)
        automine(chain, False)
        try:
            client.get("/a/1", headers={"PAYMENT-SIGNATURE": header_a})  # broadcast, not mined: settlement_pending
            [row_a] = [r for r in ledger.all() if r.payer.lower() == payer.lower()]
            assert row_a.tx_hash and known(chain, row_a.tx_hash)
            chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        finally:
            automine(chain, True)
        drained: list[int] = []

        def spend_it(_: Any) -> None:  # B verified (its balance read), its upstream running
            if drain == "exact-payment":
                drained.append(httpx.get(f"{url}/a/2", headers={"PAYMENT-SIGNATURE": header_c}, timeout=60).status_code)
            else:
                drained.extend(asyncio.run(pay_calls(url, channel_client(chain, key, "0x" + os.urandom(32).hex(), spend), 1)))

        rec.on("read_b", spend_it)
        try:
            answer_b = client.get("/b/1", headers={"PAYMENT-SIGNATURE": header_b})
        finally:
            rec.on("read_b", None)
    assert drained == [200] and chain.balance(payer) == PRICE // 2  # A and the drain moved
    [row_b] = [r for r in ledger.all() if r.tool == "read_b" and r.payer.lower() == payer.lower()]
    assert settler_statuses(chain, start) == [1, 1], (row_b.state, row_b.error_reason)  # A, the drain: no revert
    assert answer_b.status_code == 402 and MARKER_PREFIX not in answer_b.text and row_b.state != PaymentState.SETTLED
    paid_to_payee = PRICE * (2 if drain == "exact-payment" else 1)
    assert chain.balance(PAY_TO) - pay_to_before == paid_to_payee and rec.count("read_b") >= 1
