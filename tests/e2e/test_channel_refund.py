"""A payer's cooperative refund through the gateway (x402 batch-settlement: a ``refund`` payload):
the official SDK client's ``refund(url)`` gets back everything it has not spent, after the calls
accrued so far are claimed; nothing is bought (no ledger row, no upstream call); the channel then
takes no voucher until a new deposit, and a second refund finds nothing left."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions

from settlement.ledger import PaymentState
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_contract import ESCROW_ADDRESS
from tests.conftest import PAY_TO, Devchain, GatewayFactory
from tests.e2e.test_channel_attacks import _header, _voucher
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, upstream_calls

pytestmark = pytest.mark.e2e


def test_the_sdk_clients_refund_gets_back_what_was_not_spent(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, channel_claim_every_calls=1000)
    payer = devchain.address(2)
    scheme = BatchSettlementEvmScheme(Account.from_key(devchain.key(2)), BatchSettlementEvmSchemeOptions(salt="0x" + "ab" * 32))
    client = x402Client()
    client.register("eip155:31337", scheme)
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    before = (devchain.balance(payer), devchain.balance(PAY_TO))
    assert asyncio.run(pay_calls(gateway.url, client, 4)) == [200] * 4
    # Before the floor's calls are charged (X402GW_CHANNEL_MIN_DEPOSIT_CALLS, 10), a cooperative refund
    # would cost the seller a claim and a refund for 4 prices: refused, nothing sent (the escrow's own
    # withdrawal, on the payer's gas, stays open to it).
    sent = devchain.w3.eth.get_transaction_count(devchain.deployment.deployer)
    with pytest.raises(RuntimeError, match="invalid_batch_settlement_evm_refund_too_early"):  # the SDK's way to say it
        scheme.refund(f"{gateway.url}/quotes/ACME")
    assert devchain.w3.eth.get_transaction_count(devchain.deployment.deployer) == sent
    assert asyncio.run(pay_calls(gateway.url, client, 6)) == [200] * 6
    calls, rows = upstream_calls(upstream), len(gateway.ledger.all())

    refund = scheme.refund(f"{gateway.url}/quotes/ACME")

    assert refund.success and refund.transaction.startswith("0x")
    assert devchain.balance(payer) == before[0] - 10 * PRICE  # the deposit's rest came back
    assert devchain.balance(PAY_TO) - before[1] == 10 * PRICE  # the accrued calls were claimed first
    assert int(refund.amount or 0) == 100 * PRICE - 10 * PRICE
    assert {r.state for r in gateway.ledger.all()} == {PaymentState.SETTLED} and len(gateway.ledger.all()) == rows
    assert upstream_calls(upstream) == calls  # nothing was bought
    # Nothing is left: a second refund is refused with its code, and no transaction is sent.
    with gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))
    last = max((p for p in map(row_payment, gateway.ledger.all()) if p is not None), key=lambda p: p.max_claimable)
    again = _voucher(devchain, 2, last, last.max_claimable)
    again["type"] = "refund"
    escrow = devchain.balance(ESCROW_ADDRESS)
    response = httpx.get(f"{gateway.url}/quotes/ACME", headers={"PAYMENT-SIGNATURE": _header(required, again)}, timeout=30)
    assert (response.status_code, response.json()["error"]) == (402, "invalid_batch_settlement_evm_refund_no_balance")
    assert devchain.balance(ESCROW_ADDRESS) == escrow
