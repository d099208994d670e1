"""The x402 ``batch-settlement`` scheme through the gateway on anvil, paid by the official x402 SDK's
batch-settlement client: 100 calls through one channel, one deposit, claims every 25 calls; the sum
of the claimed vouchers equals the payee's balance change equals the ledger, each call a row settled
by the claim that covered it."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions

from gateway.cli.main import main
from settlement.ledger import PaymentState
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_contract import ESCROW_ADDRESS
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_reconcile import run_reconcile

pytestmark = pytest.mark.e2e

PRICE = 1_000  # 0.001 USDC a call
CATALOG = """
catalog: 1
owner: acme-channels
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 300
  scheme: batch-settlement
upstreams:
  legacy:
    base_url: "{upstream}"
tools:
  - name: get_quote
    description: Latest price of a ticker, paid per call from a prepaid channel.
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.001
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
"""


def channel_gateway(start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
                    **settings: Any) -> RunningGateway:
    path = tmp_path / "channels.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=upstream))
    return start_gateway(path, **settings)


def sdk_client(devchain: Devchain, payer: int, salt: str) -> x402Client:
    client = x402Client()
    options = BatchSettlementEvmSchemeOptions(salt=salt)
    client.register("eip155:31337", BatchSettlementEvmScheme(Account.from_key(devchain.key(payer)), options))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    return client


async def pay_calls(url: str, client: x402Client, count: int, symbol: str = "ACME") -> list[int]:
    statuses = []
    async with x402HttpxClient(client, timeout=30) as http:
        for _ in range(count):
            statuses.append((await http.get(f"{url}/quotes/{symbol}")).status_code)
    return statuses


def upstream_calls(upstream: str) -> int:
    return int(httpx.get(f"{upstream}/stats").json()["total"])


def escrow_transactions(devchain: Devchain, start: int) -> list[dict[str, Any]]:
    """The transactions sent to the escrow since block ``start`` (anvil mines one per block)."""
    found = []
    for number in range(start, devchain.w3.eth.block_number + 1):
        for tx in devchain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if tx["to"] == ESCROW_ADDRESS:
                found.append(dict(tx))
    return found


def test_sdk_client_pays_100_calls_through_one_channel(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, channel_claim_every_calls=25)
    with gateway.client() as http:
        [accept] = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))["accepts"]
    assert accept["scheme"] == "batch-settlement" and accept["amount"] == str(PRICE)
    assert accept["extra"]["receiverAuthorizer"] == devchain.deployment.deployer
    assert accept["extra"]["minDeposit"] == str(100 * PRICE) and accept["extra"]["withdrawDelay"] == 900
    payer = devchain.address(2)
    before = (devchain.balance(payer), devchain.balance(PAY_TO), devchain.balance(ESCROW_ADDRESS))
    start = devchain.w3.eth.block_number + 1

    statuses = asyncio.run(pay_calls(gateway.url, sdk_client(devchain, 2, "0x" + "a1" * 32), 100))

    assert statuses == [200] * 100 and upstream_calls(upstream) == 100
    rows = gateway.ledger.all()
    assert len(rows) == 100 and all(r.state == PaymentState.SETTLED and r.amount == PRICE for r in rows)
    payments = [row_payment(r) for r in rows]
    assert len({p.channel_id for p in payments if p is not None}) == 1
    assert sorted(p.max_claimable for p in payments if p is not None) == [PRICE * i for i in range(1, 101)]
    sent = escrow_transactions(devchain, start)
    deposits = [tx for tx in sent if tx["input"][:4].hex() == "140f1e75"]
    claims = [tx for tx in sent if tx["input"][:4].hex() != "140f1e75"]
    assert len(deposits) == 1 and len(claims) == 4  # one deposit; a claim every 25 calls
    assert {r.tx_hash for r in rows} == {"0x" + tx["hash"].hex().removeprefix("0x") for tx in claims}
    paid, earned = before[0] - devchain.balance(payer), devchain.balance(PAY_TO) - before[1]
    assert earned == sum(r.amount for r in rows) == 100 * PRICE  # claimed vouchers == payee's gain == ledger
    assert paid == 100 * PRICE * 1 + (devchain.balance(ESCROW_ADDRESS) - before[2])  # the rest waits in the channel
    assert all(r.gas_used is not None for r in rows)  # each call carries its share of its claim's gas
    # Reconcile ties each claim to its calls: 4 claims of 25 calls, each equal to its transfer to payTo.
    code, report = run_reconcile(gateway, start)
    assert code == 0, report
    assert (report["matched"], report["missing_on_chain"], report["amount_mismatch"]) == (100, [], [])
    assert (report["chain_payments"], report["chain_other_transfers"]) == (4, 0)
    assert sorted(len(c["calls"]) for c in report["channel_claims"]) == [25] * 4
    assert all(c["amount_atomic"] == c["chain_amount_atomic"] == str(25 * PRICE) for c in report["channel_claims"])
    # The export shows each call's channel, voucher and claim.
    exported = [json.loads(line) for line in _export(gateway).splitlines()]
    assert {e["channel_id"] for e in exported} == {payments[0].channel_id if payments[0] else None}
    assert sorted(int(e["voucher_cumulative_atomic"]) for e in exported) == [PRICE * i for i in range(1, 101)]
    assert {e["claim_tx"] for e in exported} == {r.tx_hash for r in rows}


def _export(gateway: RunningGateway) -> str:
    result = CliRunner().invoke(main, ["ledger", "export", "--format", "jsonl", "--database-url", gateway.settings.database_url])
    assert result.exit_code == 0, result.output
    return str(result.stdout)
