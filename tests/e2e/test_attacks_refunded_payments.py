"""Refunded payments, attacked (a review of prices, quotes and receipts; real anvil, real gateway on
loopback, sample upstream) and fixed: a payment whose charge is owed or paid back has no signed receipt
(409 ``receipt_refunded``), and a refund paid by the time its call ends gives the budget reservation back.

Each test asserts the invariant on the ledger, chain balances, upstream calls and receipt
verification; each fails on the current code because of the hole its docstring names.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from gateway.surfaces.receipts import challenge_message
from settlement.finance.receipts import recover_receipt_signer
from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, demo_catalog, upstream_hits
from tests.e2e.test_exactly_once import signed
from tests.support.polling import poll

pytestmark = pytest.mark.e2e

PAYER = 5
PRICE = 4000  # the upfront tool's price (0.004 USDC)
FAILING = "/review-upfront/reports/500"  # the upstream answers 500: the payment settled first, a refund is paid
WORKING = "/review-upfront/reports/7"

UPFRONT_TOOL = """
  - name: review_report_upfront
    description: Generate a report; side effects, so the payment settles first.
    method: GET
    path: /review-upfront/reports/{report_id}
    upstream_path: /reports/{report_id}
    price: "0.004"
    settle: upfront
"""


def upfront_catalog(tmp_path: Path, upstream: str) -> Path:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    return catalog




def fetch_receipt(client: httpx.Client, key: str, signer: str, payment_id: int) -> httpx.Response:
    timestamp = int(time.time())
    message = encode_defunct(text=challenge_message(signer, payment_id, timestamp))
    signature = "0x" + bytes(Account.sign_message(message, key).signature).hex()
    return client.get(f"/receipts/{payment_id}",
                      headers={"X402GW-Receipt-Time": str(timestamp), "X402GW-Receipt-Signature": signature})


def test_a_refunded_payment_gets_no_signed_receipt_attesting_the_charge(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """Hole: ``settlement/finance/receipts.py`` ``receipt_payload`` (and ``gateway/surfaces/receipts.py``
    ``ReceiptEndpoint.receipt``) checks only ``state == SETTLED``; a refund leaves the row SETTLED
    with ``refund_tx``/``refunded_at`` set, so the payer whose call bought nothing and who got every
    atom back still obtains a gateway-signed receipt saying it paid ``amount`` for ``tool``, which
    ``x402gw receipt verify`` accepts. Finance, reconciling offline from receipts, counts a charge
    that does not exist (and the payer holds proof of a paid answer it never got)."""
    gateway = start_gateway(upfront_catalog(tmp_path, upstream), refund_key=devchain.key(9))
    payer = devchain.address(PAYER)
    before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        signer = client.get("/.well-known/x402").json()["receipts"]["signer"]
        header = signed(client, devchain, FAILING, payer=PAYER)
        failed = client.get(FAILING, headers={"PAYMENT-SIGNATURE": header})
        assert failed.status_code == 500, failed.text
        [row] = poll(lambda: [r for r in gateway.ledger.all() if r.tool == "review_report_upfront"],
                     lambda rows: len(rows) == 1 and rows[0].refunded_at is not None, 30)
        # The refund really went back on chain: the payer is whole, the seller kept nothing.
        assert row.state == PaymentState.SETTLED and row.refund_tx and row.refunded_at is not None
        assert poll(lambda: devchain.balance(payer), lambda b: b == before_payer, 30) == before_payer
        assert devchain.balance(PAY_TO) == before_pay_to  # the refund key is payTo's: the seller kept nothing
        fetched = fetch_receipt(client, devchain.key(PAYER), signer, row.id)
    assert "x402gw-receipt" not in failed.headers
    if fetched.status_code == 200:
        receipt = fetched.json()
        # A receipt for this payment must not attest a charge the refund undid.
        assert recover_receipt_signer(receipt) == signer
        assert receipt["payload"]["amount"] == "0", (
            f"a refunded payment got a valid signed receipt for {receipt['payload']['amount']} atomic units"
        )
    else:
        assert fetched.status_code == 409, fetched.text


def test_refunded_calls_do_not_consume_the_payers_budget(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """Hole: ``gateway/safety/checks.py`` ``_MONEY_MAY_HAVE_MOVED`` includes ``refund_owed`` and
    ``refunded`` and ``_money_moved`` keeps a SETTLED row's whole amount even when its refund was
    paid, so every upfront call whose upstream failed (bought nothing, every atom refunded) stays
    counted in the payer's budget for the whole window. An honest payer with a 0.008/day budget,
    after two refunded failures (net spend 0), is refused the working call (403 budget_exceeded)."""
    gateway = start_gateway(upfront_catalog(tmp_path, upstream), refund_key=devchain.key(9),
                            budget_per_payer="0.008/1d")
    payer = devchain.address(PAYER)
    before_payer = devchain.balance(payer)
    with gateway.client() as client:
        for _ in range(2):
            header = signed(client, devchain, FAILING, payer=PAYER)
            failed = client.get(FAILING, headers={"PAYMENT-SIGNATURE": header})
            assert failed.status_code == 500, failed.text
        rows = poll(lambda: [r for r in gateway.ledger.all() if r.tool == "review_report_upfront"],
                    lambda rs: len(rs) == 2 and all(r.refunded_at is not None for r in rs), 30)
        assert [r.refunded_at is not None for r in rows] == [True, True]
        # Net spend so far: nothing (both refunds landed on chain).
        assert poll(lambda: devchain.balance(payer), lambda b: b == before_payer, 30) == before_payer
        hits_before = upstream_hits(upstream, "GET /reports/7")
        header = signed(client, devchain, WORKING, payer=PAYER)
        answer = client.get(WORKING, headers={"PAYMENT-SIGNATURE": header})
    assert answer.status_code == 200, answer.text
    assert devchain.balance(payer) == before_payer - PRICE
    assert upstream_hits(upstream, "GET /reports/7") == hits_before + 1
    settled = [r for r in gateway.ledger.all() if r.tool == "review_report_upfront" and r.refunded_at is None]
    assert [(r.state, r.amount) for r in settled] == [(PaymentState.SETTLED, PRICE)]
