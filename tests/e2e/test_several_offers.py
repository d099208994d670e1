"""Several offers per tool (issue 16 item 2): one tool sold for two tokens on one chain and a token
on a second chain (a second anvil, chain id 31338). The official Python SDK client pays once with
each offer; each settles exactly once, the ledger row names the chosen network and asset and
equals the chain; every discovery surface lists every offer; a payment that mixes offers, or names
an offer that is not listed, or is signed for another offer than the one it names, is refused
before verify, with nothing charged and the upstream not called; dollar budgets count across
dollar stablecoins."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_typing import HexStr
from pydantic import SecretStr
from web3 import Web3
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.anvil import Anvil
from gateway.devkit.devchain import deploy_token, mint
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.chain.client import SEL_BALANCE_OF
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import decode_header_json
from tests.conftest import PAY_TO, Devchain, running_devchain, upstream_hits

SECOND_CHAIN_ID = 31338
PAYER = 5
PRICE = 2000  # 0.002 in 6-decimal units: the tool's price, in USDC on both chains
PRICE_TWO = 3000  # the second token's own price


@dataclass
class Offers:
    """The two chains and the three tokens the catalog offers."""

    a: Devchain  # eip155:31337: USDC (the catalog's payment) and "Dollar Two"
    b_rpc: str  # eip155:31338: USDC
    usdc_a: str
    two_a: str
    usdc_b: str
    settlement_key: str

    def balance(self, rpc: str, token: str, owner: str) -> int:
        data = SEL_BALANCE_OF + bytes(12) + bytes.fromhex(owner[2:])
        w3 = Web3(Web3.HTTPProvider(rpc))
        return int.from_bytes(w3.eth.call({"to": Web3.to_checksum_address(token), "data": HexStr("0x" + data.hex())}), "big")

    def balances(self, owner: str) -> dict[str, int]:
        return {
            "usdc_a": self.balance(self.a.anvil.rpc_url, self.usdc_a, owner),
            "two_a": self.balance(self.a.anvil.rpc_url, self.two_a, owner),
            "usdc_b": self.balance(self.b_rpc, self.usdc_b, owner),
        }


@pytest.fixture(scope="module")
def offers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offers]:
    directory = tmp_path_factory.mktemp("offers")
    with running_devchain(directory) as a, Anvil(0, chain_id=SECOND_CHAIN_ID) as b:
        payer = a.address(PAYER)
        two_a = deploy_token(a.anvil.rpc_url, name="Dollar Two", symbol="USD2", version="1")
        mint(a.anvil.rpc_url, two_a, [payer], 1_000_000_000)
        deploy_token(b.rpc_url)  # not offered: the offered token's address differs from the first chain's USDC
        usdc_b = deploy_token(b.rpc_url)
        mint(b.rpc_url, usdc_b, [payer], 1_000_000_000)
        # anvil's dev keys settle only on the local chain id: a key of our own, with gas on both
        key = Account.create()
        for rpc in (a.anvil.rpc_url, b.rpc_url):
            Web3(Web3.HTTPProvider(rpc)).provider.make_request(
                "anvil_setBalance", [key.address, hex(10**20)]  # type: ignore[arg-type]
            )
        yield Offers(a, b.rpc_url, a.token, two_a, usdc_b, key.key.hex())


def catalog_text(offers: Offers, upstream: str, extra_tool: str = "") -> str:
    return f"""
catalog: 1
owner: multi
payment:
  network: "eip155:31337"
  asset: "{offers.usdc_a}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{PAY_TO}"
  max_timeout_seconds: 120
offers:
  - {{asset: "{offers.two_a}", asset_name: "Dollar Two", asset_version: "1", decimals: 6, usd_pegged: true, price: "0.003"}}
  - {{network: "eip155:{SECOND_CHAIN_ID}", asset: "{offers.usdc_b}", asset_name: "USD Coin", asset_version: "2",
      decimals: 6, usd_pegged: true}}
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: get_quote
    description: Latest price in USD for a stock ticker symbol
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: "0.002"
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
{extra_tool}"""


@dataclass
class Gateway:
    url: str
    ledger: Any


@pytest.fixture
def start(offers: Offers, upstream: str, tmp_path: Path) -> Iterator[Any]:
    servers: list[ThreadServer] = []

    def run(text: str | None = None, **overrides: Any) -> Gateway:
        path = tmp_path / f"offers{len(servers)}.yaml"
        path.write_text(text or catalog_text(offers, upstream))
        settings = Settings(
            catalog=[path], deployment_file=offers.a.deployment_file,
            database_url=f"sqlite:///{tmp_path / f'ledger{len(servers)}.sqlite3'}", receipt_timeout_seconds=10,
            rpc_urls={"eip155:31337": offers.a.anvil.rpc_url, f"eip155:{SECOND_CHAIN_ID}": offers.b_rpc},
            settlement_key=SecretStr(offers.settlement_key), **overrides,
        )
        ledger = open_ledger(settings.database_url)
        server = ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start()
        servers.append(server)
        return Gateway(server.url, ledger)

    yield run
    for server in servers:
        server.stop()


def sdk_pay(offers: Offers, url: str, network: str, asset: str) -> tuple[int, Any, Any]:
    """The official SDK client, picking the offer on ``network`` in ``asset`` from the 402's accepts."""
    payer = Account.from_key(offers.a.key(PAYER))

    def pick(version: int, accepts: list[Any]) -> Any:
        return next(r for r in accepts if r.network == network and r.asset.lower() == asset.lower())

    client = x402Client(payment_requirements_selector=pick)
    for net in ("eip155:31337", f"eip155:{SECOND_CHAIN_ID}"):
        client.register(net, ExactEvmScheme(signer=payer))
    client.set_spend_controls(False)

    async def call() -> tuple[int, Any, Any]:
        async with x402HttpxClient(client, timeout=30) as http:
            response = await http.get(url)
            paid = response.status_code == 200
            settle = x402HTTPClient(client).get_payment_settle_response(response.headers.get) if paid else None
            return response.status_code, response.json(), settle

    return asyncio.run(call())


def test_each_offer_is_paid_once_and_settles_exactly_once(offers: Offers, start: Any, upstream: str) -> None:
    gateway = start()
    payer = offers.a.address(PAYER)
    unpaid = httpx.get(f"{gateway.url}/quotes/ACME")
    accepts = unpaid.json()["accepts"]
    assert [(a["network"], a["asset"], a["amount"]) for a in accepts] == [
        ("eip155:31337", offers.usdc_a, str(PRICE)),
        ("eip155:31337", offers.two_a, str(PRICE_TWO)),
        (f"eip155:{SECOND_CHAIN_ID}", offers.usdc_b, str(PRICE)),
    ]
    assert decode_header_json(unpaid.headers["payment-required"])["accepts"] == accepts
    chosen = [("eip155:31337", offers.usdc_a, "usdc_a", PRICE), ("eip155:31337", offers.two_a, "two_a", PRICE_TWO),
              (f"eip155:{SECOND_CHAIN_ID}", offers.usdc_b, "usdc_b", PRICE)]
    for network, asset, which, amount in chosen:
        payer_before, payee_before = offers.balances(payer), offers.balances(PAY_TO)
        hits = upstream_hits(upstream, "GET /api/v1/quote/ACME")
        status, body, settle = sdk_pay(offers, f"{gateway.url}/quotes/ACME", network, asset)
        assert status == 200, body
        assert settle.success and settle.network == network
        assert upstream_hits(upstream, "GET /api/v1/quote/ACME") == hits + 1
        payer_after, payee_after = offers.balances(payer), offers.balances(PAY_TO)
        # exactly this offer's token moved, by exactly its amount, once
        assert {k: payer_before[k] - payer_after[k] for k in payer_before} == {
            k: (amount if k == which else 0) for k in payer_before}
        assert {k: payee_after[k] - payee_before[k] for k in payee_before} == {
            k: (amount if k == which else 0) for k in payee_before}
        row = gateway.ledger.all()[-1]
        assert (row.state, row.network, row.asset, row.amount, row.tx_hash) == (
            PaymentState.SETTLED, network, asset, amount, settle.transaction)
    rows = gateway.ledger.all()
    assert len(rows) == 3 and len({r.tx_hash for r in rows}) == 3


def test_every_discovery_surface_lists_every_offer(offers: Offers, start: Any) -> None:
    gateway = start()
    wanted = {("eip155:31337", offers.usdc_a), ("eip155:31337", offers.two_a), (f"eip155:{SECOND_CHAIN_ID}", offers.usdc_b)}
    with httpx.Client(base_url=gateway.url) as client:
        [tool] = client.get("/tools").json()["tools"]
        operation = client.get("/openapi.json").json()["paths"]["/quotes/{symbol}"]["get"]
        [item] = client.get("/.well-known/x402").json()["items"]
        [resource] = client.get("/discovery/resources").json()["items"]
        llms = client.get("/llms.txt").text
        listed = mcp_list(client)
    assert {(o["network"], o["asset"]) for o in tool["offers"]} == wanted
    assert [o["atomic"] for o in tool["offers"]] == [str(PRICE), str(PRICE_TWO), str(PRICE)]
    assert (tool["asset"], tool["priceAtomic"]) == (offers.usdc_a, str(PRICE))  # the first offer, as before
    assert {(o["network"], o["asset"]) for o in operation["x-x402-price"]["offers"]} == wanted
    assert {(a["network"], a["asset"]) for a in item["accepts"]} == wanted
    assert {(a["network"], a["asset"]) for a in resource["accepts"]} == wanted
    assert {(o["network"], o["asset"]) for o in listed["offers"]} == wanted
    for network, asset in wanted:
        assert asset in llms and network in llms


def mcp_list(client: httpx.Client) -> dict[str, Any]:
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    client.post("/mcp", json=init, headers=headers).raise_for_status()
    listed = client.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)
    tools = [t for t in listed.json()["result"]["tools"] if t["name"] == "get_quote"]
    price: dict[str, Any] = tools[0]["_meta"]["x402/price"]
    return price


# -- attacks: a payment that mixes offers or names another ------------------------------------------


def signed_for(offers: Offers, url: str, network: str, asset: str) -> dict[str, Any]:
    """A valid v2 payload for one offer, as the SDK signs it (decoded, to be tampered with)."""
    payer = Account.from_key(offers.a.key(PAYER))

    def pick(version: int, accepts: list[Any]) -> Any:
        return next(r for r in accepts if r.network == network and r.asset.lower() == asset.lower())

    client = x402Client(payment_requirements_selector=pick)
    for net in ("eip155:31337", f"eip155:{SECOND_CHAIN_ID}"):
        client.register(net, ExactEvmScheme(signer=payer))
    client.set_spend_controls(False)
    unpaid = httpx.get(url)
    http = x402HTTPClient(client)
    required = http.get_payment_required_response(unpaid.headers.get, unpaid.json())
    payload = asyncio.run(client.create_payment_payload(required))
    return dict(payload.model_dump(by_alias=True, exclude_none=True))


def send(url: str, payload: dict[str, Any]) -> httpx.Response:
    header = base64.b64encode(json.dumps(payload).encode()).decode()
    return httpx.get(url, headers={"PAYMENT-SIGNATURE": header})


def accepts_of(url: str) -> list[dict[str, Any]]:
    accepts: list[dict[str, Any]] = httpx.get(url).json()["accepts"]
    return accepts


MIXES = {
    # the network of the second chain's offer with the first offer's asset and amount
    "network_of_one_asset_of_another": lambda accepts: {**accepts[0], "network": accepts[2]["network"]},
    # the cheaper offer's amount with the dearer offer's asset
    "cheaper_amount_dearer_asset": lambda accepts: {**accepts[1], "amount": accepts[0]["amount"]},
    # an asset no offer names, at a listed price
    "not_in_the_list": lambda accepts: {**accepts[0], "asset": "0x" + "7" * 40},
    # the dearer token's domain named in extra with the cheaper offer
    "extra_of_another": lambda accepts: {**accepts[0], "extra": accepts[1]["extra"]},
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_a_payment_mixing_offers_is_refused_before_verify(offers: Offers, start: Any, upstream: str, mix: str) -> None:
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    payload = signed_for(offers, url, "eip155:31337", offers.usdc_a)
    payload["accepted"] = MIXES[mix](accepts_of(url))
    before, hits = offers.balances(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/ACME")
    refused = send(url, payload)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"] == "payment_requirements_mismatch"
    assert len(refused.json()["accepts"]) == 3  # a fresh offer, all of it
    assert gateway.ledger.all() == []  # refused before verify and record: no row
    assert offers.balances(PAY_TO) == before and upstream_hits(upstream, "GET /api/v1/quote/ACME") == hits


@pytest.mark.parametrize("other", [1, 2])
def test_a_payment_signed_for_one_offer_sent_as_another_is_refused_before_verify(
    offers: Offers, start: Any, upstream: str, other: int
) -> None:
    """Signed for the first offer (USDC on 31337), ``accepted`` set to another listed offer as a
    whole: bound to that offer, the signature does not recover under its token's domain."""
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    payload = signed_for(offers, url, "eip155:31337", offers.usdc_a)
    accepted = accepts_of(url)[other]
    payload["accepted"] = accepted
    payload["payload"]["authorization"]["value"] = accepted["amount"]  # the amount it claims to pay
    before, hits = offers.balances(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/ACME")
    refused = send(url, payload)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"] == "invalid_exact_evm_payload_signature"
    assert gateway.ledger.all() == []
    assert offers.balances(PAY_TO) == before and upstream_hits(upstream, "GET /api/v1/quote/ACME") == hits


def test_the_cheaper_amount_signed_over_the_dearer_token_is_not_charged(offers: Offers, start: Any, upstream: str) -> None:
    """``accepted`` is the dearer offer as listed, but the authorization signed over its token pays
    the cheaper offer's amount: verify refuses it (the exact amount), nothing moves or runs."""
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    payload = signed_for(offers, url, "eip155:31337", offers.two_a)
    payload["payload"]["authorization"]["value"] = str(PRICE)
    payer = Account.from_key(offers.a.key(PAYER))
    payload["payload"]["signature"] = resign(payer, offers.two_a, "Dollar Two", "1", 31337, payload)
    before, hits = offers.balances(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/ACME")
    refused = send(url, payload)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"] == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert all(row.state != PaymentState.SETTLED for row in gateway.ledger.all())
    assert offers.balances(PAY_TO) == before and upstream_hits(upstream, "GET /api/v1/quote/ACME") == hits


def resign(payer: Any, token: str, name: str, version: str, chain_id: int, payload: dict[str, Any]) -> str:
    a = payload["payload"]["authorization"]
    typed = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": token},
        "message": {"from": a["from"], "to": a["to"], "value": int(a["value"]), "validAfter": int(a["validAfter"]),
                    "validBefore": int(a["validBefore"]), "nonce": bytes.fromhex(a["nonce"][2:])},
    }
    return "0x" + bytes(payer.sign_typed_data(full_message=typed).signature).hex()


def test_budgets_count_dollars_across_dollar_stablecoins(offers: Offers, start: Any, upstream: str) -> None:
    """A per-payer budget of $0.004: USDC on 31337 (0.002) then USDC on 31338 (0.002) use it up, so
    the third call, in the second token on 31337, is refused whatever token it pays in."""
    text = catalog_text(offers, upstream).replace(
        "upstreams:", 'budgets:\n  per_payer: {amount: "0.004", window: 1d}\nupstreams:', 1)
    gateway = start(text)
    url = f"{gateway.url}/quotes/ACME"
    assert sdk_pay(offers, url, "eip155:31337", offers.usdc_a)[0] == 200
    assert sdk_pay(offers, url, f"eip155:{SECOND_CHAIN_ID}", offers.usdc_b)[0] == 200
    before = offers.balances(PAY_TO)
    status, body, _ = sdk_pay(offers, url, "eip155:31337", offers.two_a)
    assert status == 403 and body["error"] == "budget_exceeded", body
    assert (body["limit"], body["used"]) == ("0.004", "0.004")
    assert offers.balances(PAY_TO) == before
