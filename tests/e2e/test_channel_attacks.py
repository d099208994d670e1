"""Attacks on batch-settlement channels through the gateway, each refused with its code and nothing
moved: no ledger row settled or accrued, the payer's, payee's and escrow's balances as they were, no
upstream call. A voucher replayed for another request, a cumulative amount that does not increase,
one above the deposit (a channel opened with a deposit for two calls), a channel whose payer is withdrawing or that the receiver has closed, a wrong
channel id, a forged voucher and a forged deposit. Closing the channel gives the payer back what was
not claimed."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from x402 import x402Client
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.store.memory import MemoryStore
from gateway.wiring import build_schemes
from settlement.ledger import PaymentState
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_claims import Claimer
from settlement.schemes.channels_contract import ESCROW_ADDRESS, ChannelPayment
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.contracts.test_channel_escrow import WITHDRAW_ABI
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, sdk_client, upstream_calls

pytestmark = pytest.mark.e2e

NEVER_BY_COUNT = {"channel_claim_every_calls": 1000, "channel_claim_every_seconds": 600}


def _open(gateway: RunningGateway, devchain: Devchain, payer: int, salt: str, calls: int = 2) -> ChannelPayment:
    """A channel opened by the SDK client (its deposit and ``calls`` paid calls); its last payment."""
    assert asyncio.run(pay_calls(gateway.url, sdk_client(devchain, payer, salt), calls)) == [200] * calls
    payments = [row_payment(r) for r in gateway.ledger.all()]
    last = max((p for p in payments if p is not None and p.payer == devchain.address(payer)), key=lambda p: p.max_claimable)
    return last


def _required(gateway: RunningGateway, path: str = "/quotes/ACME") -> dict[str, Any]:
    with gateway.client() as http:
        required: dict[str, Any] = json.loads(base64.b64decode(http.get(path).headers["PAYMENT-REQUIRED"]))
    return required


def _header(required: dict[str, Any], payload: dict[str, Any]) -> str:
    wire = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0], "payload": payload}
    return base64.b64encode(json.dumps(wire).encode()).decode()


def _voucher(devchain: Devchain, signer: int, channel: ChannelPayment, cumulative: int, channel_id: str | None = None) -> dict[str, Any]:
    fields = sign_voucher(EthAccountSigner(Account.from_key(devchain.key(signer))), channel_id or channel.channel_id,
                          cumulative, "eip155:31337")
    return {"type": "voucher", "channelConfig": channel.config.to_dict(), "voucher": fields.to_dict()}


class Books:
    """What must not move: ledger rows by state, balances, upstream calls."""

    def __init__(self, gateway: RunningGateway, devchain: Devchain, upstream: str, payer: str) -> None:
        self.gateway, self.devchain, self.upstream, self.payer = gateway, devchain, upstream, payer
        self.before = self.now()

    def now(self) -> tuple[Any, ...]:
        states = sorted((r.id, r.state) for r in self.gateway.ledger.all() if r.state in (PaymentState.SETTLED, PaymentState.SETTLING))
        return (states, self.devchain.balance(self.payer), self.devchain.balance(PAY_TO),
                self.devchain.balance(ESCROW_ADDRESS), upstream_calls(self.upstream))

    def unchanged(self) -> bool:
        return self.now() == self.before


def _refused(gateway: RunningGateway, header: str, path: str = "/quotes/ACME") -> tuple[int, str]:
    with gateway.client() as http:
        response = http.get(path, headers={"PAYMENT-SIGNATURE": header})
    return response.status_code, str(response.json().get("error"))


def test_each_forged_or_stale_voucher_is_refused_with_its_code_and_nothing_moves(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, **NEVER_BY_COUNT)
    channel = _open(gateway, devchain, 5, "0x" + "d4" * 32)  # charged: 2 calls
    required = _required(gateway)
    charged = channel.max_claimable
    books = Books(gateway, devchain, upstream, channel.payer)
    wrong_id = "0x" + "ee" * 32
    attacks: dict[str, tuple[dict[str, Any], str]] = {
        "not increasing": (_voucher(devchain, 5, channel, charged - PRICE // 2), "invalid_batch_settlement_evm_cumulative_not_increasing"),
        "more than the price": (_voucher(devchain, 5, channel, charged + 2 * PRICE), "invalid_batch_settlement_evm_cumulative_amount_mismatch"),
        "wrong channel id": (_voucher(devchain, 5, channel, charged + PRICE, wrong_id), "invalid_batch_settlement_evm_channel_id_mismatch"),
        "forged voucher": (_voucher(devchain, 6, channel, charged + PRICE), "invalid_batch_settlement_evm_voucher_signature"),
    }
    for name, (payload, code) in attacks.items():
        assert _refused(gateway, _header(required, payload)) == (402, code), name
    # A deposit whose ERC-3009 authorization is not the payer's.
    forged_deposit = _voucher(devchain, 5, channel, charged + PRICE)
    forged_deposit.update(type="deposit", deposit={"amount": "5000", "authorization": {"erc3009Authorization": {
        "validAfter": "0", "validBefore": str(int(time.time()) + 300), "salt": "0x" + "01" * 32,
        "signature": "0x" + "11" * 65}}})
    assert _refused(gateway, _header(required, forged_deposit)) == (402, "invalid_batch_settlement_evm_receive_authorization_signature")
    assert books.unchanged()
    # The next honest voucher still goes through: the refusals left the channel as it was.
    honest = _header(required, _voucher(devchain, 5, channel, charged + PRICE))
    with gateway.client() as http:
        first = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": honest})
        assert first.status_code == 200
        books = Books(gateway, devchain, upstream, channel.payer)
        # Resent while its call is accrued (no claim yet): the answer it paid for, not a second charge.
        again = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": honest})
    assert again.status_code == 200 and again.headers.get("x402gw-replay") == "true" and again.content == first.content
    assert books.unchanged()


def test_a_voucher_above_the_deposit_is_refused(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    # A channel of two calls (the owner's floor lowered to one call: the default refuses it).
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, channel_min_deposit_calls=1, **NEVER_BY_COUNT)
    small = BatchSettlementEvmSchemeOptions(salt="0x" + "d8" * 32, deposit_strategy=lambda ctx: str(2 * PRICE))
    client = x402Client()
    client.register("eip155:31337", BatchSettlementEvmScheme(Account.from_key(devchain.key(3)), small))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    assert asyncio.run(pay_calls(gateway.url, client, 2)) == [200, 200]  # the deposit holds two calls
    channel = max((p for p in map(row_payment, gateway.ledger.all()) if p is not None), key=lambda p: p.max_claimable)
    books = Books(gateway, devchain, upstream, channel.payer)
    status = _refused(gateway, _header(_required(gateway), _voucher(devchain, 3, channel, channel.max_claimable + PRICE)))
    assert status == (402, "invalid_batch_settlement_evm_cumulative_exceeds_balance") and books.unchanged()


def test_a_replayed_voucher_is_never_charged_twice(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, channel_claim_every_calls=1)
    channel = _open(gateway, devchain, 6, "0x" + "d5" * 32)
    required = _required(gateway)
    voucher = _voucher(devchain, 6, channel, channel.max_claimable + PRICE)
    fresh = _header(required, voucher)
    with gateway.client() as http:
        first = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": fresh})
    assert first.status_code == 200
    books = Books(gateway, devchain, upstream, channel.payer)
    with gateway.client() as http:
        again = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": fresh})  # the same request: its answer
        elsewhere = http.get("/quotes/OTHER", headers={"PAYMENT-SIGNATURE": fresh})  # another request
        rewrapped = _header(_required(gateway, "/quotes/OTHER"), voucher)  # ... in that request's own offer
        replayed = http.get("/quotes/OTHER", headers={"PAYMENT-SIGNATURE": rewrapped})
    assert again.status_code == 200 and again.headers.get("x402gw-replay") == "true" and again.content == first.content
    # A replayed voucher is one the channel has already charged: its cumulative amount does not increase.
    assert (replayed.status_code, replayed.json()["error"]) == (402, "invalid_batch_settlement_evm_cumulative_not_increasing")
    assert (elsewhere.status_code, elsewhere.json()["error"]) == (402, "payment_requirements_mismatch")
    assert books.unchanged()


def test_a_withdrawing_or_closed_channel_takes_no_voucher_and_closing_refunds_the_rest(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path, **NEVER_BY_COUNT)
    channel = _open(gateway, devchain, 7, "0x" + "d6" * 32, calls=3)
    required = _required(gateway)
    payer_before, payee_before = devchain.balance(channel.payer), devchain.balance(PAY_TO)
    deposit = devchain.balance(ESCROW_ADDRESS)  # this channel's whole deposit is among it

    async def close() -> int:
        wiring = build_schemes(gateway.settings, gateway.catalogs)
        assert wiring.channels is not None
        try:
            outcome, receipt = await Claimer(wiring.channels, gateway.ledger, MemoryStore()).close("eip155:31337", channel)
            assert receipt is not None and receipt.status == 1
            return len(outcome.settled)
        finally:
            for chain in wiring.chains.values():
                await chain.close()

    assert asyncio.run(close()) == 3  # the accrued calls are claimed, then the rest goes back
    assert devchain.balance(PAY_TO) - payee_before == 3 * PRICE
    refunded = devchain.balance(channel.payer) - payer_before
    assert refunded > 0 and deposit - devchain.balance(ESCROW_ADDRESS) == refunded + 3 * PRICE
    books = Books(gateway, devchain, upstream, channel.payer)
    status = _refused(gateway, _header(required, _voucher(devchain, 7, channel, channel.max_claimable + PRICE)))
    assert status == (402, "invalid_batch_settlement_evm_channel_closed") and books.unchanged()

    # A channel whose payer has asked for its deposit back (withdrawal pending) takes no more vouchers.
    other = _open(gateway, devchain, 8, "0x" + "d7" * 32, calls=1)
    initiate_withdraw(devchain, 8, other)
    books = Books(gateway, devchain, upstream, other.payer)
    status = _refused(gateway, _header(required, _voucher(devchain, 8, other, other.max_claimable + PRICE)))
    assert status == (402, "invalid_batch_settlement_evm_channel_withdrawing") and books.unchanged()


def initiate_withdraw(devchain: Devchain, payer: int, channel: ChannelPayment) -> None:
    escrow = devchain.w3.eth.contract(address=ESCROW_ADDRESS, abi=WITHDRAW_ABI)
    tx = escrow.functions.initiateWithdraw(channel.config_tuple(), 1).transact({"from": devchain.address(payer)})
    assert devchain.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
