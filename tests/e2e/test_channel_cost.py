"""The cost rule of issue 19, measured as ``bench.cost_per_call`` measures it: on anvil, a
batch-settlement channel of 100 calls (paid by the official SDK client through the gateway: one
deposit, one claim) costs the seller at most 1/20 of the gas per call of exact (one transfer per
call)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.cost_per_call import channel_cost, exact_costs
from tests.conftest import Devchain, GatewayFactory
from tests.e2e.test_channel_paid_calls import channel_gateway

pytestmark = pytest.mark.e2e


def test_gas_per_call_at_100_calls_per_channel_is_at_most_a_twentieth_of_exact(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    [exact] = asyncio.run(exact_costs(devchain.deployment, singles=3, batches=()))
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path,
                              channel_claim_every_calls=100, channel_deposit_calls=100)
    channel = channel_cost(gateway.url, devchain.deployment.rpc_url, devchain.key(1), devchain.token, 100, "0x" + "f1" * 32)
    assert channel.transactions == 2  # the deposit and one claim
    assert channel.gas_per_call <= exact.gas_per_call / 20, (channel, exact)
