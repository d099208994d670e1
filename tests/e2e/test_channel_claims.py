"""When batch-settlement vouchers are claimed, and that none is lost: accepted calls stay accrued
(ledger rows ``settling``, nothing moved to the payee) until a claim by time lands, which settles
them with its transaction; a gateway killed with -9 while calls are accrued claims them when it
starts again, and the channel goes on from there."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from catalog import load_catalogs
from gateway.settings import Settings
from gateway.store.memory import MemoryStore
from gateway.wiring import build_schemes
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_claims import Claimer
from settlement.schemes.channels_contract import parse_channel
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_channel_attacks import _voucher
from tests.e2e.test_channel_paid_calls import CATALOG, PRICE, channel_gateway, pay_calls, sdk_client
from tests.e2e.test_reconcile import run_reconcile
from tests.support.processes import gateway_processes

pytestmark = pytest.mark.e2e

NEVER_BY_COUNT = {"channel_claim_every_calls": 1000, "channel_claim_every_seconds": 600}


def test_calls_stay_accrued_until_the_claim_by_time_settles_them(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, **NEVER_BY_COUNT)
    before = devchain.balance(PAY_TO)
    assert asyncio.run(pay_calls(gateway.url, sdk_client(devchain, 3, "0x" + "b2" * 32), 5)) == [200] * 5
    rows = gateway.ledger.all()
    assert [r.state for r in rows] == [PaymentState.SETTLING] * 5 and not any(r.tx_hash for r in rows)
    assert devchain.balance(PAY_TO) == before  # accrued: the vouchers wait for their claim

    async def tick(after_seconds: float) -> int:
        wiring = build_schemes(gateway.settings, gateway.catalogs)
        assert wiring.channels is not None
        claimer = Claimer(wiring.channels, gateway.ledger, MemoryStore(), clock=lambda: time.time() + after_seconds)
        try:
            return sum(len(outcome.settled) for outcome in await claimer.tick())
        finally:
            for chain in wiring.chains.values():
                await chain.close()

    assert asyncio.run(tick(0)) == 0  # the oldest voucher has not waited claim_every_seconds
    assert devchain.balance(PAY_TO) == before
    assert asyncio.run(tick(3600)) == 5
    rows = gateway.ledger.all()
    assert {r.state for r in rows} == {PaymentState.SETTLED} and len({r.tx_hash for r in rows}) == 1
    assert devchain.balance(PAY_TO) - before == sum(r.amount for r in rows) == 5 * PRICE


def test_kill_9_with_calls_accrued_then_restart_claims_them(devchain: Devchain, upstream: str, tmp_path: Path) -> None:
    catalog = tmp_path / "channels.yaml"
    catalog.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=upstream))
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
           "X402GW_DATABASE_URL": database_url, "X402GW_CHANNEL_CLAIM_EVERY_CALLS": "1000",
           "X402GW_CHANNEL_CLAIM_EVERY_SECONDS": "600"}
    ledger = open_ledger(database_url)
    client = sdk_client(devchain, 4, "0x" + "c3" * 32)  # one payer, one channel, across both processes
    before = devchain.balance(PAY_TO)
    start = devchain.w3.eth.block_number + 1
    with gateway_processes([env], tmp_path) as [gateway]:
        assert asyncio.run(pay_calls(gateway.url, client, 10)) == [200] * 10
        assert [r.state for r in ledger.all()] == [PaymentState.SETTLING] * 10
        gateway.kill9()  # ten vouchers accepted, none claimed
    assert devchain.balance(PAY_TO) == before
    with gateway_processes([env], tmp_path) as [restarted]:
        # Start-up claimed what the crash left accrued, before serving.
        rows = ledger.all()
        assert {r.state for r in rows} == {PaymentState.SETTLED} and len({r.tx_hash for r in rows}) == 1
        assert devchain.balance(PAY_TO) - before == 10 * PRICE
        # The channel goes on: the next voucher continues from what was claimed.
        assert asyncio.run(pay_calls(restarted.url, client, 1)) == [200]
    assert [r.state for r in ledger.all()].count(PaymentState.SETTLED) == 10
    settings = Settings(catalog=[catalog], deployment_file=devchain.deployment_file, database_url=database_url)
    code, report = run_reconcile(RunningGateway("", settings, ledger, load_catalogs(settings.catalog)), start)
    assert code == 1 and len(report["still_open"]) == 1  # the eleventh call waits for its claim
    assert (report["matched"], report["missing_on_chain"], report["amount_mismatch"]) == (10, [], [])
    ledger.close()


def test_a_voucher_written_ahead_but_never_accepted_is_claimed_once_its_acceptance_is_over(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """A crash between writing a voucher ahead (its answer stored) and accepting it, with a shared
    store that keeps the channel's total: the row is claimed once the acceptance lock has lapsed,
    and the store's total follows it, so the channel goes on."""
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, **NEVER_BY_COUNT)
    assert asyncio.run(pay_calls(gateway.url, sdk_client(devchain, 6, "0x" + "b7" * 32), 3)) == [200] * 3
    last = max((p for p in map(row_payment, gateway.ledger.all()) if p is not None), key=lambda p: p.max_claimable)
    fourth = _voucher(devchain, 6, last, last.max_claimable + PRICE)
    row = gateway.ledger.record_verified(
        request_id="crashed", owner="acme-channels", tool="get_quote", method="GET", path="/quotes/ACME",
        payer=last.payer, pay_to=PAY_TO, amount=PRICE, network="eip155:31337", asset=devchain.token,
        nonce=parse_channel(fourth).nonce_key(), valid_before=2**62, authorization=json.dumps(fourth),  # type: ignore[union-attr]
    )
    gateway.ledger.begin_settlement(row.id, (200, [], b"{}"))
    store = MemoryStore()
    key = f"chan:eip155:31337:{last.channel_id}"
    asyncio.run(store.put(key, json.dumps({"charged": str(last.max_claimable)}).encode()))  # the shared store's total
    before = devchain.balance(PAY_TO)

    async def claim(after_seconds: float) -> int:
        wiring = build_schemes(gateway.settings, gateway.catalogs)
        assert wiring.channels is not None
        claimer = Claimer(wiring.channels, gateway.ledger, store, clock=lambda: time.time() + after_seconds)
        try:
            return len((await claimer.claim("eip155:31337")).settled)
        finally:
            for chain in wiring.chains.values():
                await chain.close()

    assert asyncio.run(claim(0)) == 3  # its acceptance may still be under way: not claimed yet
    assert gateway.ledger.get(row.id).state == PaymentState.SETTLING  # type: ignore[union-attr]
    assert asyncio.run(claim(120)) == 1  # the lock has lapsed: a crash; it is claimed
    assert gateway.ledger.get(row.id).state == PaymentState.SETTLED  # type: ignore[union-attr]
    assert devchain.balance(PAY_TO) - before == 4 * PRICE
    assert json.loads(asyncio.run(store.get(key)) or b"{}")["charged"] == str(last.max_claimable + PRICE)
