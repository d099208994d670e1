"""What each paid call costs the seller on chain, by scheme: gas, and what that gas costs.

    python -m bench.cost_per_call [--gas-price-gwei 0.01] [--eth-usd 3000] [--price 0.001]

On a fresh anvil with the dev chain's contracts:

* ``exact`` per call: one ``transferWithAuthorization`` per payment, sent by the local facilitator
  (median of 20; payTo already holds tokens).
* ``exact`` through the BatchSettler: 1, 10 and 100 payments per batch transaction (each still its
  own token transfer inside it).
* ``batch-settlement``: 1, 10, 100 and 1,000 calls per channel, each run paid by the official x402
  SDK's batch-settlement client through an x402gw gateway (in process, loopback HTTP, its own
  ledger), which makes the channel's one deposit and one claim (claim every N calls); the seller's
  gas is the deposit's plus the claim's (the deposit is sent, and paid for, by the seller, as the
  x402 spec has it), divided by the calls.

Seller cost per call: the gas per call at ``--gas-price-gwei`` (an L2-like price; anvil's own is
about 1 gwei) in ETH at ``--eth-usd``, and as a share of a call priced ``--price`` dollars.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.run import LOCAL_NETWORK, PAY_TO, anvil, payment_headers, rpc

CHANNEL_CALLS = (1, 10, 100, 1000)
BATCH_SIZES = (1, 10, 100)
CATALOG = """
catalog: 1
owner: bench-channels
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 600
  scheme: batch-settlement
upstreams:
  legacy:
    base_url: "{upstream}"
tools:
  - name: get_quote
    description: A quote, paid per call from a channel.
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.001
    input_schema:
      type: object
      properties: {{symbol: {{type: string}}}}
      required: [symbol]
"""


@dataclass(frozen=True)
class Cost:
    scheme: str
    calls: int  # paid calls the transactions below settled
    transactions: int
    gas: int  # all of them

    @property
    def gas_per_call(self) -> float:
        return self.gas / self.calls


def gas_used(rpc_url: str, tx_hash: str) -> int:
    return int(rpc(rpc_url, "eth_getTransactionReceipt", [tx_hash])["gasUsed"], 16)


async def exact_costs(deployment: Any, singles: int = 20, batches: tuple[int, ...] = BATCH_SIZES) -> list[Cost]:
    """One transfer per payment (the median of ``singles``), then BatchSettler batches of ``batches``."""
    from settlement.chain.client import JsonRpcChain
    from settlement.schemes.batch import BatchingFacilitator, BatchPolicy
    from settlement.schemes.exact_local import LocalFacilitator
    from settlement.x402.codec import decode_header_json
    from settlement.x402.wire import PaymentPayload, PaymentRequirements

    req = PaymentRequirements(
        scheme="exact", network=LOCAL_NETWORK, amount="1000", asset=deployment.token.address, pay_to=PAY_TO,
        max_timeout_seconds=600, extra={"name": deployment.token.name, "version": deployment.token.version},
    )

    def payloads(n: int) -> list[PaymentPayload]:
        return [PaymentPayload.model_validate(decode_header_json(h)) for h in payment_headers({"accepts": [req.to_wire()]}, n)]

    chain = JsonRpcChain(deployment.rpc_url, 31337, deployment.settlement_key)
    local = LocalFacilitator({LOCAL_NETWORK: chain})
    costs = []
    try:
        settled = [await local.settle(p, req) for p in payloads(singles)]
        gas = sorted(gas_used(deployment.rpc_url, s.transaction) for s in settled)
        costs.append(Cost("exact, one transfer per call", 1, 1, gas[len(gas) // 2]))
        for size in batches:
            batching = BatchingFacilitator(local, {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: str(deployment.batch_settler)},
                                           {LOCAL_NETWORK: BatchPolicy(10_000, size)})
            results = await asyncio.gather(*(batching.settle(p, req) for p in payloads(size)))
            assert all(r.success for r in results), results
            costs.append(Cost(f"exact, BatchSettler {size} per batch", size, 1,
                              gas_used(deployment.rpc_url, results[0].transaction)))
    finally:
        await chain.close()
    return costs


@contextmanager
def channel_gateway(deployment_file: Path, workdir: Path, upstream: str, token: str, calls: int) -> Iterator[str]:
    """An x402gw gateway selling one batch-settlement tool, claiming every ``calls`` calls."""
    from catalog import load_catalogs
    from gateway.app import create_app
    from gateway.ops.serving import ThreadServer
    from gateway.settings import Settings
    from settlement.schema import open_ledger

    catalog = workdir / f"channels-{calls}.yaml"
    catalog.write_text(CATALOG.format(token=token, pay_to=PAY_TO, upstream=upstream))
    settings = Settings(catalog=[catalog], deployment_file=deployment_file,
                        database_url=f"sqlite:///{workdir / f'ledger-{calls}.sqlite3'}",
                        channel_claim_every_calls=calls, channel_deposit_calls=calls,
                        channel_min_deposit_calls=1)
    ledger = open_ledger(settings.database_url)
    server = ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start()
    try:
        yield server.url
    finally:
        server.stop()
        ledger.close()


async def pay_channel(url: str, key: str, token: str, calls: int, salt: str) -> None:
    """``calls`` calls paid by the official SDK's batch-settlement client through one channel."""
    from eth_account import Account
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
    from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions

    client = x402Client()
    client.register("eip155:31337", BatchSettlementEvmScheme(Account.from_key(key), BatchSettlementEvmSchemeOptions(salt=salt)))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": token}]})
    async with x402HttpxClient(client, timeout=60) as http:
        for _ in range(calls):
            response = await http.get(f"{url}/quotes/ACME")
            assert response.status_code == 200, response.text


def escrow_gas(rpc_url: str, start: int) -> tuple[int, int]:
    """(transactions, gas) sent to the batch-settlement escrow from block ``start`` on."""
    from settlement.schemes.channels_contract import ESCROW_ADDRESS

    count = gas = 0
    end = int(rpc(rpc_url, "eth_blockNumber", []), 16)
    for number in range(start, end + 1):
        block = rpc(rpc_url, "eth_getBlockByNumber", [hex(number), True])
        for tx in block["transactions"]:
            if (tx.get("to") or "").lower() == ESCROW_ADDRESS.lower():
                count += 1
                gas += gas_used(rpc_url, tx["hash"])
    return count, gas


def channel_cost(url: str, rpc_url: str, key: str, token: str, calls: int, salt: str) -> Cost:
    start = int(rpc(rpc_url, "eth_blockNumber", []), 16) + 1
    asyncio.run(pay_channel(url, key, token, calls, salt))
    transactions, gas = escrow_gas(rpc_url, start)
    return Cost(f"batch-settlement, {calls} calls per channel", calls, transactions, gas)


def measure(workdir: Path) -> list[Cost]:
    from gateway.devkit.samples import rest_upstream
    from gateway.ops.serving import ThreadServer

    with anvil(workdir) as deployment, ThreadServer(rest_upstream.create_app()) as upstream:
        deployment_file = workdir / "devchain.json"
        deployment.write(deployment_file)
        costs = asyncio.run(exact_costs(deployment))
        for i, calls in enumerate(CHANNEL_CALLS):
            with channel_gateway(deployment_file, workdir, upstream.url, deployment.token.address, calls) as url:
                key = deployment.accounts[i % len(deployment.accounts)].private_key
                costs.append(channel_cost(url, deployment.rpc_url, key, deployment.token.address, calls, f"0x{i + 1:064x}"))
    return costs


def table(costs: list[Cost], gas_price_gwei: Decimal, eth_usd: Decimal, price_usd: Decimal) -> list[str]:
    exact = costs[0].gas_per_call
    lines = [f"{'scheme':40} {'calls':>6} {'txs':>4} {'gas':>10} {'gas/call':>9} {'vs exact':>8} "
             f"{'$/call':>10} {'of price':>8}"]
    for c in costs:
        usd = Decimal(c.gas_per_call) * gas_price_gwei * Decimal("1e-9") * eth_usd
        lines.append(f"{c.scheme:40} {c.calls:6} {c.transactions:4} {c.gas:10} {c.gas_per_call:9.0f} "
                     f"{c.gas_per_call / exact:8.3f} {usd:10.7f} {usd / price_usd:8.2%}")
    lines.append(f"(seller's gas at {gas_price_gwei} gwei, ETH at ${eth_usd}, a call priced ${price_usd})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gas-price-gwei", type=Decimal, default=Decimal("0.01"))
    parser.add_argument("--eth-usd", type=Decimal, default=Decimal("3000"))
    parser.add_argument("--price", type=Decimal, default=Decimal("0.001"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        costs = measure(Path(workdir))
    print("\n".join(table(costs, args.gas_price_gwei, args.eth_usd, args.price)))


if __name__ == "__main__":
    main()
