"""The x402 ``upto`` scheme through the gateway on anvil, paid by the official x402 SDK's upto client:
the 402 offers the maximum and says what will be charged; the call settles the tool's price (below
the maximum) exactly once; the ledger equals the chain. Attacks beside it: a mutated field of a valid
payment is refused with nothing moved; one payment raced twice settles once; a signature over
another payTo is refused."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired as SdkPaymentRequired

from settlement.ledger import PaymentState
from settlement.schemes import upto_maximum
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, upstream_hits
from tests.e2e.test_reconcile import run_reconcile

PRICE, MAXIMUM = 2_000, 10_000  # 0.002 charged of at most 0.01 USDC
CATALOG = """
catalog: 1
owner: acme-upto
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  legacy:
    base_url: "{upstream}"
tools:
  - name: get_quote
    description: Latest price of a ticker, paid up to a maximum.
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.002
    max_price: 0.01
    payment: {{scheme: upto}}
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
  - name: get_report
    description: A report, paid before it is made.
    method: GET
    path: /reports/{{report_id}}
    price: 0.002
    max_price: 0.01
    settle: upfront
    payment: {{scheme: upto}}
    input_schema:
      type: object
      properties: {{report_id: {{type: string}}}}
      required: [report_id]
"""


def _gateway(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path, **settings: Any,
) -> RunningGateway:
    path = tmp_path / "upto.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=upstream))
    return start_gateway(path, **settings)


def _client(devchain: Devchain, payer: int) -> x402Client:
    client = x402Client()
    client.register("eip155:31337", UptoEvmClientScheme(Account.from_key(devchain.key(payer))))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    return client


def _header(devchain: Devchain, payer: int, required: dict[str, Any]) -> str:
    client = _client(devchain, payer)
    payload = asyncio.run(client.create_payment_payload(SdkPaymentRequired.model_validate(required)))
    return base64.b64encode(json.dumps(payload.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()).decode()


def _offer(gateway: RunningGateway, path: str = "/quotes/ACME") -> dict[str, Any]:
    with gateway.client() as http:
        response = http.get(path)
    assert response.status_code == 402
    required: dict[str, Any] = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    return required


def test_the_offer_names_the_maximum_and_the_charge(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    [accept] = _offer(_gateway(start_gateway, devchain, upstream, tmp_path))["accepts"]
    assert accept["scheme"] == "upto" and accept["amount"] == str(MAXIMUM)
    assert accept["extra"]["charge"] == {"basis": "price", "amount": str(PRICE)}
    assert accept["extra"]["facilitatorAddress"] == devchain.deployment.deployer
    assert accept["extra"]["assetTransferMethod"] == "permit2"
    with _gateway(start_gateway, devchain, upstream, tmp_path).client() as http:
        [tool] = [t for t in http.get("/tools").json()["tools"] if t["function"]["name"] == "get_quote"]
    assert tool["scheme"] == "upto" and tool["priceAtomic"] == str(PRICE) and tool["maximum"] == "0.01"
    assert "at most 0.01" in tool["chargeText"]


def test_sdk_upto_client_pays_the_price_once_and_the_ledger_equals_the_chain(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path)
    payer = devchain.address(3)
    before = (devchain.balance(payer), devchain.balance(PAY_TO))
    start = devchain.w3.eth.block_number + 1

    async def call() -> tuple[int, Any]:
        async with x402HttpxClient(_client(devchain, 3), timeout=30) as http:
            response = await http.get(f"{gateway.url}/quotes/ACME")
            return response.status_code, x402HTTPClient(_client(devchain, 3)).get_payment_settle_response(response.headers.get)

    status, settle = asyncio.run(call())
    assert status == 200 and settle.success and settle.transaction.startswith("0x")
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == settle.transaction and row.payer == payer
    assert row.amount == PRICE and upto_maximum(row) == MAXIMUM
    assert (before[0] - devchain.balance(payer), devchain.balance(PAY_TO) - before[1]) == (PRICE, PRICE)
    # x402gw reconcile finds the Permit2 transfer of the row's own transaction: the books agree.
    code, report = run_reconcile(gateway, start)
    assert code == 0, report
    assert (report["matched"], report["missing_on_chain"], report["amount_mismatch"]) == (1, [], [])
    assert (report["chain_payments"], report["chain_other_transfers"]) == (1, 0)


def test_a_mutated_field_is_refused_with_nothing_moved(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path)
    good = json.loads(base64.b64decode(_header(devchain, 5, _offer(gateway))))
    mutations = {
        "amount": lambda a: a["permitted"].update(amount=str(MAXIMUM * 10)),
        "to": lambda a: a["witness"].update(to=devchain.address(5)),
        "deadline": lambda a: a.update(deadline=str(int(a["deadline"]) + 30)),
        "nonce": lambda a: a.update(nonce=str(int(a["nonce"]) + 1)),
        "facilitator": lambda a: a["witness"].update(facilitator=devchain.address(6)),
    }
    before = (devchain.balance(devchain.address(5)), devchain.balance(PAY_TO), upstream_hits(upstream, "/api/v1/quote/ACME"))
    reasons: list[str] = []
    for name, mutate in mutations.items():
        bad = copy.deepcopy(good)
        mutate(bad["payload"]["permit2Authorization"])
        with gateway.client() as http:
            response = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(bad).encode()).decode()})
        assert response.status_code == 402, (name, response.text)
        reasons.append(response.json()["error"])
    assert (devchain.balance(devchain.address(5)), devchain.balance(PAY_TO), upstream_hits(upstream, "/api/v1/quote/ACME")) == before
    assert all(row.state != PaymentState.SETTLED for row in gateway.ledger.all())
    assert reasons == ["invalid_permit2_signature"] * len(mutations)  # bound by the signature, offline


def test_one_payment_raced_twice_settles_once(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path)
    header = _header(devchain, 6, _offer(gateway))
    before = (devchain.balance(devchain.address(6)), devchain.balance(PAY_TO))

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            return list(await asyncio.gather(*(http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": header}) for _ in range(2))))

    responses = asyncio.run(race())
    assert 200 in [r.status_code for r in responses], [r.text for r in responses]
    with gateway.client() as http:  # sent once more, later: the stored answer, no second charge
        again = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200 and again.json() == next(r for r in responses if r.status_code == 200).json()
    rows = gateway.ledger.all()
    assert [r.state for r in rows] == [PaymentState.SETTLED] and rows[0].amount == PRICE
    assert (before[0] - devchain.balance(devchain.address(6)), devchain.balance(PAY_TO) - before[1]) == (PRICE, PRICE)


def test_a_signature_over_another_pay_to_is_refused(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path)
    required = _offer(gateway)
    elsewhere = copy.deepcopy(required)
    elsewhere["accepts"][0]["payTo"] = devchain.address(7)
    signed = json.loads(base64.b64decode(_header(devchain, 7, elsewhere)))
    signed["accepted"] = required["accepts"][0]  # presented as a payment of our offer
    forged = copy.deepcopy(signed)
    forged["payload"]["permit2Authorization"]["witness"]["to"] = PAY_TO  # and its witness rewritten
    before = (devchain.balance(devchain.address(7)), devchain.balance(PAY_TO))
    for attempt in (signed, forged):
        with gateway.client() as http:
            response = http.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(attempt).encode()).decode()})
        assert response.status_code == 402, response.text
    assert (devchain.balance(devchain.address(7)), devchain.balance(PAY_TO)) == before


def test_an_upfront_call_that_fails_refunds_the_charge_not_the_maximum(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    gateway = _gateway(start_gateway, devchain, upstream, tmp_path, refund_key=devchain.key(9))
    header = _header(devchain, 8, _offer(gateway, "/reports/500"))
    before = (devchain.balance(devchain.address(8)), devchain.balance(PAY_TO))
    with gateway.client() as http:
        failed = http.get("/reports/500", headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and failed.headers["x402gw-refund"].startswith("refunded 0x"), failed.text
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.amount == PRICE and row.refund_owed == PRICE
    assert (devchain.balance(devchain.address(8)), devchain.balance(PAY_TO)) == before  # charged 2000, given back 2000
