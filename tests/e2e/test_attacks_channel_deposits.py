"""batch-settlement deposits the gateway pays for, attacked end to end (a real anvil, the escrow,
the x402 SDK's client, a real gateway and upstream on loopback).

The gateway makes each channel's deposit itself (its settlement account pays the gas) and later
claims its vouchers (gas again). A griefer who opens a channel for one call's price costs the seller
a deposit and a claim for one price of revenue (bench.cost_per_call: 230k gas for one call, against
21k a call on a channel of 10), again with each new channel at no cost of its own. The 402 suggests
``minDeposit`` (price × ``channel_deposit_calls``); a deposit below price ×
``channel_min_deposit_calls`` is refused before anything is sent
(``invalid_batch_settlement_evm_deposit_below_min_deposit``). Asserted on the settlement account's
nonce and gas, the payer's balance, the ledger and the upstream's calls."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient

from gateway.errors import GatewayConfigError
from gateway.settings import Settings
from tests.conftest import Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_attacks_channel_payers import _client, _rows_of
from tests.e2e.test_attacks_gas import fresh_payer, spent
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, upstream_calls

pytestmark = pytest.mark.e2e

NEVER = {"channel_claim_every_calls": 1000, "channel_claim_every_seconds": 600}


def _gateway(start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, **settings: Any) -> RunningGateway:
    return channel_gateway(start_gateway, chain, upstream, tmp_path, **NEVER, **settings)


def _offer(gateway: RunningGateway) -> dict[str, Any]:
    with gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))
    [offer] = [o for o in required["accepts"] if o["scheme"] == "batch-settlement"]
    return dict(offer)


async def _paid(url: str, client: x402Client) -> tuple[int, str | None]:
    """One call through the SDK's client: its status and, for a 402, the code it names."""
    async with x402HttpxClient(client, timeout=30) as http:
        answer = await http.get(f"{url}/quotes/ACME")
    required = answer.headers.get("PAYMENT-REQUIRED")
    return answer.status_code, json.loads(base64.b64decode(required)).get("error") if required else None


def test_a_deposit_below_the_floor_is_refused_before_the_gateway_pays_its_gas(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path)
    assert _offer(gateway)["extra"]["minDeposit"] == str(100 * PRICE)  # the suggestion; the floor is 10 prices
    griefer_key = fresh_payer(devchain, 100 * PRICE)
    griefer = Account.from_key(griefer_key).address
    calls, rows = upstream_calls(upstream), len(gateway.ledger.all())
    balance, (nonce, eth) = devchain.balance(griefer), spent(devchain)

    for deposit in (PRICE, 9 * PRICE + 999):  # one call's price; one unit short of the floor
        client = _client(devchain, griefer_key, "0x" + f"{deposit:064x}"[-64:], deposit)
        status, code = asyncio.run(_paid(gateway.url, client))
        assert (status, code) == (402, "invalid_batch_settlement_evm_deposit_below_min_deposit")

    assert spent(devchain) == (nonce, eth)  # no deposit sent, no gas spent
    assert devchain.balance(griefer) == balance
    assert upstream_calls(upstream) == calls and len(gateway.ledger.all()) == rows
    assert _rows_of(gateway, griefer) == []

    # At the floor, the channel opens and its calls are served.
    honest = _client(devchain, griefer_key, "0x" + "c1" * 32, 10 * PRICE)
    assert asyncio.run(pay_calls(gateway.url, honest, 2)) == [200, 200]
    assert devchain.balance(griefer) == balance - 10 * PRICE  # the deposit moved into the escrow
    assert upstream_calls(upstream) == calls + 2


def test_the_floor_is_the_owners_and_cannot_exceed_the_suggested_deposit(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    # Lowered by the owner: a channel of one call's price opens.
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path, channel_min_deposit_calls=1)
    payer_key = fresh_payer(devchain, 10 * PRICE)
    assert asyncio.run(pay_calls(gateway.url, _client(devchain, payer_key, "0x" + "c2" * 32, PRICE), 1)) == [200]
    # Above the suggestion, clients following the 402 would be refused: the gateway does not start.
    with pytest.raises(GatewayConfigError) as error:
        Settings(catalog=[], channel_min_deposit_calls=101, channel_deposit_calls=100)
    assert error.value.code == "invalid_configuration" and "X402GW_CHANNEL_MIN_DEPOSIT_CALLS" in str(error.value)
