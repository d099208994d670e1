"""Dynamic exact prices (issue 18 item 3) on the real stack: anvil, the gateway on loopback, the
sample upstream. A report priced per symbol (POST body, settled upfront, its answer stored) and a
forecast priced per day (GET query, the unpaid fast path). The 402's amount is the rule's result
for the arguments; paying it settles exactly that on chain and in the ledger (also through the
official SDK client); a payment signed for cheap arguments sent with dear ones, or a settled cheap
payment replayed on dear arguments, is refused before any upstream call and charges nothing;
arguments whose price is above max_price, or fractional or negative counts, are a 422 before any 402;
discovery describes the rule instead of one amount."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_typing import HexStr
from web3 import Web3
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.devchain import deploy_token, mint
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.chain.client import SEL_BALANCE_OF
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import decode_header_json, encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    RunningGateway,
    offer_of,
    running_devchain,
    upstream_hits,
)

PAYER = 8
REPORTS = "POST /reports"


def catalog(devchain: Devchain, upstream: str, tmp_path: Path) -> Path:
    path = tmp_path / "dynamic.yaml"
    path.write_text(f"""catalog: 1
owner: dynamic
payment:
  network: "eip155:31337"
  asset: "{devchain.token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{PAY_TO}"
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: symbol_report
    description: A report on a list of ticker symbols
    method: POST
    path: /reports
    price: {{per: symbols, each: "0.001"}}
    max_price: "0.05"
    input_schema:
      type: object
      properties:
        topic: {{type: string}}
        symbols: {{type: array, items: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [topic, symbols]
  - name: forecast
    description: Weather for a city, priced per day of forecast
    method: GET
    path: /weather
    price: {{base: "0.002", per: days, each: "0.0005"}}
    input_schema:
      type: object
      properties:
        city: {{type: string}}
        days: {{type: integer, minimum: 0}}
      required: [city, days]
""")
    return path


@pytest.fixture
def gateway(start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path) -> RunningGateway:
    return start_gateway(catalog(devchain, upstream, tmp_path))


def symbols(n: int) -> list[str]:
    return ["S" + chr(65 + i // 26) + chr(65 + i % 26) for i in range(n)]


def report(n: int) -> dict[str, Any]:
    return {"topic": "prices", "symbols": symbols(n)}


def signed(client: httpx.Client, devchain: Devchain, body: dict[str, Any], **overrides: Any) -> tuple[str, int]:
    """A payment for ``body``'s 402 offer (optionally tampered with): header and the offered amount."""
    offer = offer_of(client.post("/reports", json=body))
    requirements = offer.accepts[0]
    payment = Payer(devchain.key(PAYER)).sign(requirements, resource=offer.resource, overrides=overrides or None)
    return encode_header(payment), int(requirements.amount)


def test_the_402_amount_is_the_rule_for_each_argument_set(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        for n in (1, 3, 10):
            offer = offer_of(client.post("/reports", json=report(n)))
            assert offer.accepts[0].amount == str(1000 * n)
        for days in (0, 1, 7):  # unpaid GETs: the fast path keys its 402 by the query, so each has its own
            for _ in range(2):
                offer = offer_of(client.get("/weather", params={"city": "Oslo", "days": days}))
                assert offer.accepts[0].amount == str(2000 + 500 * days)
    assert gateway.ledger.all() == []


def test_paying_a_dynamic_price_settles_exactly_it(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        for n in (2, 5):
            before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)
            header, amount = signed(client, devchain, report(n))
            assert amount == 1000 * n
            paid = client.post("/reports", json=report(n), headers={"PAYMENT-SIGNATURE": header})
            assert paid.status_code == 202, paid.text
            assert devchain.balance(payer) == before_payer - amount
            assert devchain.balance(PAY_TO) == before_pay_to + amount
            row = gateway.ledger.all()[-1]
            assert (row.state, row.amount, row.payer, row.tool) == (PaymentState.SETTLED, amount, payer, "symbol_report")
            receipt = decode_header_json(paid.headers["payment-response"])
            assert receipt["transaction"] == row.tx_hash
    assert upstream_hits(upstream, REPORTS) == 2


def test_the_official_sdk_client_pays_a_dynamic_price(gateway: RunningGateway, devchain: Devchain) -> None:
    account = Account.from_key(devchain.key(PAYER))
    client = x402Client()
    client.register("eip155:31337", ExactEvmScheme(signer=account))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    before_payer, before_pay_to = devchain.balance(account.address), devchain.balance(PAY_TO)

    async def call() -> tuple[int, Any, Any]:
        async with x402HttpxClient(client, timeout=30) as http:
            response = await http.get(f"{gateway.url}/weather", params={"city": "Oslo", "days": 4})
            settle = x402HTTPClient(client).get_payment_settle_response(response.headers.get)
            return response.status_code, response.json(), settle

    status, body, settle = asyncio.run(call())
    assert status == 200, body
    assert body["city"] == "Oslo" and settle.success
    amount = 2000 + 4 * 500
    assert devchain.balance(account.address) == before_payer - amount
    assert devchain.balance(PAY_TO) == before_pay_to + amount
    [row] = gateway.ledger.all()
    assert (row.state, row.amount, row.tx_hash, row.tool) == (PaymentState.SETTLED, amount, settle.transaction, "forecast")


# -- attacks ---------------------------------------------------------------------------------------


def test_a_payment_for_cheap_arguments_sent_with_dear_ones_is_refused(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    """Signed for 1 symbol (0.001), sent with 10 (0.01): the binding digest covers no body, but the
    offer's amount does: the payment no longer matches the offer. Nothing is recorded or moved."""
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, amount = signed(client, devchain, report(1))
        assert amount == 1000
        refused = client.post("/reports", json=report(10), headers={"PAYMENT-SIGNATURE": header})
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"] == "payment_requirements_mismatch"
    assert [a["amount"] for a in refused.json()["accepts"]] == ["10000"]  # a fresh offer at the dear price
    assert gateway.ledger.all() == [] and devchain.balance(PAY_TO) == before
    assert upstream_hits(upstream, REPORTS) == 0


def test_a_cheap_authorization_named_as_the_dear_offer_is_refused_by_verify(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    """``accepted`` is the dear offer as listed, but the authorization signed pays the cheap amount:
    verify refuses it (the exact amount); nothing settles, the upstream is not called."""
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, amount = signed(client, devchain, report(10), value=1000)
        assert amount == 10_000
        refused = client.post("/reports", json=report(10), headers={"PAYMENT-SIGNATURE": header})
    assert refused.status_code == 402, refused.text
    assert "value" in refused.json()["error"]
    assert all(row.state != PaymentState.SETTLED for row in gateway.ledger.all())
    assert devchain.balance(PAY_TO) == before and upstream_hits(upstream, REPORTS) == 0


def test_a_settled_cheap_payment_replayed_on_dear_arguments_gets_no_stored_answer(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    with gateway.client() as client:
        header, amount = signed(client, devchain, report(1))
        paid = client.post("/reports", json=report(1), headers={"PAYMENT-SIGNATURE": header})
        assert paid.status_code == 202, paid.text
        [row] = gateway.ledger.all()
        before = devchain.balance(PAY_TO)
        replay = client.post("/reports", json=report(10), headers={"PAYMENT-SIGNATURE": header})
        again = client.post("/reports", json=report(1), headers={"PAYMENT-SIGNATURE": header})
    assert replay.status_code == 402, replay.text
    assert replay.json()["error"] == "payment_requirements_mismatch"
    assert "report_id" not in replay.text and "x402gw-replay" not in replay.headers
    assert again.status_code == 202 and again.headers.get("x402gw-replay") == "true"  # the same request: its answer
    assert [(r.id, r.state, r.amount) for r in gateway.ledger.all()] == [(row.id, PaymentState.SETTLED, 1000)]
    assert amount == 1000
    assert devchain.balance(PAY_TO) == before
    assert upstream_hits(upstream, REPORTS) == 1


def test_arguments_priced_above_max_price_are_refused_before_any_402(gateway: RunningGateway, upstream: str) -> None:
    with gateway.client() as client:
        dear = client.post("/reports", json=report(51))  # 0.051 > max_price 0.05
        huge = client.get("/weather", params={"city": "Oslo", "days": 10**80})  # beyond any token amount
    assert dear.status_code == 422 and dear.json()["error"] == "price_above_max", dear.text
    assert dear.json()["next"]["action"] == "fix_arguments" and "payment-required" not in dear.headers
    assert huge.status_code == 422 and huge.json()["error"] == "price_out_of_range", huge.text
    assert "payment-required" not in huge.headers
    assert gateway.ledger.all() == [] and upstream_hits(upstream, REPORTS) == 0


@pytest.mark.parametrize("days", ["1.5", "-1", "two"])
def test_fractional_or_negative_counts_are_refused_with_the_arguments(gateway: RunningGateway, days: str) -> None:
    with gateway.client() as client:
        refused = client.get("/weather", params={"city": "Oslo", "days": days})
        body = client.post("/reports", json={"topic": "t", "symbols": 3})
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_arguments", refused.text
    assert body.status_code == 422 and body.json()["error"] == "invalid_arguments", body.text
    assert "payment-required" not in refused.headers


def test_discovery_describes_the_rule_instead_of_one_amount(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        tools = {t["function"]["name"]: t for t in client.get("/tools").json()["tools"]}
        operation = client.get("/openapi.json").json()["paths"]["/reports"]["post"]
        llms = client.get("/llms.txt").text
        resources = {i["metadata"]["name"]: i for i in client.get("/discovery/resources").json()["items"]}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        client.post("/mcp", json=init, headers=headers).raise_for_status()
        listed = client.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers).json()
    rule = {"per": ["symbols"], "base": "0", "each": "0.001"}
    entry = tools["symbol_report"]
    assert entry["priceRule"] == rule and "price" not in entry and "priceAtomic" not in entry
    assert entry["priceText"].startswith("0.001 USD Coin per symbols")
    assert tools["forecast"]["priceRule"] == {"per": ["days"], "base": "0.002", "each": "0.0005"}
    assert operation["x-x402-price"]["priceRule"] == rule and "amount" not in operation["x-x402-price"]
    assert "0.001 USD Coin per symbols" in operation["responses"]["402"]["description"]
    assert "- price: 0.001 USD Coin per symbols" in llms
    assert resources["symbol_report"]["metadata"]["priceRule"] == rule
    [mcp_tool] = [t for t in listed["result"]["tools"] if t["name"] == "symbol_report"]
    assert mcp_tool["_meta"]["x402/price"]["priceRule"] == rule and "amount" not in mcp_tool["_meta"]["x402/price"]
    assert "0.001 USD Coin per symbols" in mcp_tool["description"]


# -- several offers: the rule on each, in each token -------------------------------------------------


def test_a_rule_prices_every_offer_and_the_chosen_one_settles_its_amount(tmp_path: Path, upstream: str) -> None:
    """A second dollar token beside USDC (its own anvil, so no deployment of the session's chain
    shifts): both offers carry the rule's amount for the arguments; paying with the second settles
    exactly that in the second token, and its ledger row names it."""
    with running_devchain(tmp_path) as chain:
        payer = chain.address(PAYER)
        two = deploy_token(chain.anvil.rpc_url, name="Dollar Two", symbol="USD2", version="1")
        mint(chain.anvil.rpc_url, two, [payer], 1_000_000_000)
        text = catalog(chain, upstream, tmp_path).read_text().replace("upstreams:", (
            f'offers:\n  - {{asset: "{two}", asset_name: "Dollar Two", asset_version: "1", decimals: 6, usd_pegged: true}}\n'
            "upstreams:"), 1)
        path = tmp_path / "offers.yaml"
        path.write_text(text)
        settings = Settings(catalog=[path], deployment_file=chain.deployment_file, receipt_timeout_seconds=10,
                            database_url=f"sqlite:///{tmp_path / 'offers.sqlite3'}")
        ledger = open_ledger(settings.database_url)
        with ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)) as server:
            client = httpx.Client(base_url=server.url, timeout=30)
            offer = offer_of(client.post("/reports", json=report(4)))
            assert [(a.asset, a.amount) for a in offer.accepts] == [(chain.token, "4000"), (two, "4000")]
            before = balances(chain, two, payer), balances(chain, two, PAY_TO)
            payment = Payer(chain.key(PAYER)).sign(offer.accepts[1], resource=offer.resource)
            paid = client.post("/reports", json=report(4), headers={"PAYMENT-SIGNATURE": encode_header(payment)})
            client.close()
        assert paid.status_code == 202, paid.text
        after = balances(chain, two, payer), balances(chain, two, PAY_TO)
        assert after[0] == (before[0][0], before[0][1] - 4000)  # USDC untouched, exactly 4000 of the second
        assert after[1] == (before[1][0], before[1][1] + 4000)
        [row] = ledger.all()
        assert (row.state, row.asset, row.amount) == (PaymentState.SETTLED, two, 4000)


def balances(chain: Devchain, two: str, owner: str) -> tuple[int, int]:
    """``owner``'s USDC and second-token balances."""
    data = HexStr("0x" + (SEL_BALANCE_OF + bytes(12) + bytes.fromhex(owner[2:])).hex())
    return tuple(  # type: ignore[return-value]
        int.from_bytes(chain.w3.eth.call({"to": Web3.to_checksum_address(token), "data": data}), "big")
        for token in (chain.token, two)
    )


def test_budgets_reserve_the_dynamic_amount(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    """A payer budget of 0.005: 4 symbols (0.004) pass; 2 more (0.002) would make 0.006 and are
    refused after verify with nothing charged, while 1 more (0.001) fits exactly."""
    path = catalog(devchain, upstream, tmp_path)
    path.write_text(path.read_text().replace(
        "upstreams:", 'budgets:\n  per_payer: {amount: "0.005", window: 1d}\nupstreams:', 1))
    gateway = start_gateway(path)
    with gateway.client() as client:
        for n, status in ((4, 202), (2, 403), (1, 202)):
            before = devchain.balance(PAY_TO)
            header, amount = signed(client, devchain, report(n))
            answer = client.post("/reports", json=report(n), headers={"PAYMENT-SIGNATURE": header})
            assert answer.status_code == status, answer.text
            if status == 403:
                assert answer.json()["error"] == "budget_exceeded"
            assert devchain.balance(PAY_TO) == before + (amount if status == 202 else 0)
    settled = [r.amount for r in gateway.ledger.all() if r.state == PaymentState.SETTLED]
    assert settled == [4000, 1000] and upstream_hits(upstream, REPORTS) == 2


def test_the_reference_agent_pays_a_dynamic_price_within_its_own_per_call_limit(
    gateway: RunningGateway, devchain: Devchain,
) -> None:
    """/tools gives a rule, not one amount: the agent discovers the catalog (it used to fail on the
    missing priceAtomic), pays the computed amount, and refuses one above its own per-call limit."""
    from tests.e2e.test_agent_cli import PAYER as AGENT_PAYER
    from tests.e2e.test_agent_cli import run_agent

    payer = devchain.address(AGENT_PAYER)
    before = devchain.balance(payer)
    paid = run_agent(gateway, devchain, "--max-spend", "0.05", "--tool", "forecast", "--args", '{"city": "Oslo", "days": 4}')
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert devchain.balance(payer) == before - 4000  # 0.002 + 4 × 0.0005
    dear = run_agent(gateway, devchain, "--max-spend", "0.05", "--max-per-call", "0.003", "--tool", "forecast",
                     "--args", '{"city": "Oslo", "days": 4}')
    assert dear.returncode == 3, dear.stdout + dear.stderr  # refused before signing: over its per-call limit
    assert devchain.balance(payer) == before - 4000
    assert [row.amount for row in gateway.ledger.all()] == [4000]
