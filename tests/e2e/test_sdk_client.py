"""The official x402 Python SDK client pays a gateway route on anvil."""

from __future__ import annotations

import asyncio

from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme

from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, RunningGateway

PAYER = 4


def test_official_sdk_client_pays_and_gets_a_receipt(gateway: RunningGateway, devchain: Devchain) -> None:
    payer = Account.from_key(devchain.key(PAYER))
    client = x402Client()
    client.register("eip155:31337", ExactEvmScheme(signer=payer))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    before_payer, before_pay_to = devchain.balance(payer.address), devchain.balance(PAY_TO)

    async def call() -> tuple[int, dict[str, object], object]:
        async with x402HttpxClient(client, timeout=30) as http:
            response = await http.get(f"{gateway.url}/weather", params={"city": "Oslo", "units": "metric"})
            settle = x402HTTPClient(client).get_payment_settle_response(response.headers.get)
            return response.status_code, response.json(), settle

    status, body, settle = asyncio.run(call())
    assert status == 200, body
    assert body["city"] == "Oslo"
    assert settle.success is True
    assert settle.transaction.startswith("0x")
    assert devchain.balance(payer.address) == before_payer - 1000
    assert devchain.balance(PAY_TO) == before_pay_to + 1000
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == settle.transaction and row.payer == payer.address
