"""Attacks on the paid path's non-HTTP-route surfaces and on the money going back out (review).

The served facilitator API (gas griefing with public or worthless authorizations, arbitrary payTo),
MCP tools/call (a payment moved across surfaces, tools or arguments; the MCP client's own headers;
an upstream forging receipts on an error), refunds raced across HTTP and MCP, and the size of what
the MCP transport buffers. Each is checked on the chain (token balances, the settlement account's
nonce and gas), the ledger and the upstream's own record, not only the status code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import httpx2
import mcp_types as types
import pytest
from eth_account import Account
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from web3 import Web3

from gateway.devkit.devchain import deploy_token, mint
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequired, PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, demo_catalog, offer_of, upstream_hits
from tests.support.forwarding_upstream import Received

PAYER = 7
NETWORK = "eip155:31337"


def settlement_account(devchain: Devchain) -> tuple[int, int]:
    """The gateway's settlement account: (transactions sent, ETH left). Any broadcast changes both."""
    address = Web3.to_checksum_address(devchain.deployment.deployer)
    return devchain.w3.eth.get_transaction_count(address), devchain.w3.eth.get_balance(address)


def facilitator_body(payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements}


async def mcp_call(url: str, name: str, arguments: dict[str, Any], payment: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> types.CallToolResult:
    client = httpx2.AsyncClient(headers=headers or {}, timeout=30)
    async with (
        client,
        streamable_http_client(f"{url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        meta = {"x402/payment": payment} if payment is not None else None
        return await session.call_tool(name, arguments, meta=meta)


def mcp_offer(url: str, name: str, arguments: dict[str, Any]) -> PaymentRequired:
    unpaid = asyncio.run(mcp_call(url, name, arguments))
    assert unpaid.is_error, unpaid
    return PaymentRequired.model_validate(unpaid.structured_content)


# -- the served facilitator: nobody makes the gateway pay gas for nothing ------------------------


@pytest.fixture
def facilitating(start_gateway: GatewayFactory) -> RunningGateway:
    """A gateway serving /facilitator, restricted (as documented) to its own payee."""
    return start_gateway(serve_facilitator=True, facilitator_pay_to=PAY_TO)


def test_a_settled_payment_rebuilt_from_the_chain_costs_the_facilitator_no_gas(
    facilitating: RunningGateway, devchain: Devchain
) -> None:
    """Every settlement's calldata is public. Replayed at /facilitator/settle (allowed payTo, valid
    signature, unexpired window) it can only revert: it must be refused before any broadcast."""
    with facilitating.client() as client:
        offer = offer_of(client.get("/quotes/FACRP"))
        signed = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        paid = client.get("/quotes/FACRP", headers={"PAYMENT-SIGNATURE": encode_header(signed)})
        assert paid.status_code == 200, paid.text
        assert devchain.authorization_state(devchain.address(PAYER), signed["payload"]["authorization"]["nonce"])
        before, balances = settlement_account(devchain), (devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO))
        answers = [client.post("/facilitator/settle", json=facilitator_body(signed, signed["accepted"]))
                   for _ in range(3)]
    for answer in answers:
        assert answer.status_code == 200 and answer.json()["success"] is False, answer.text
        assert answer.json()["errorReason"] == "invalid_exact_evm_nonce_already_used"
    assert (devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)) == balances
    assert settlement_account(devchain) == before, "each replay broadcast a reverting transaction on our gas"


def test_an_authorization_from_an_empty_account_costs_the_facilitator_no_gas(
    facilitating: RunningGateway, devchain: Devchain
) -> None:
    """A fresh key with no tokens signs a valid authorization to our own payee: worth nothing, so it
    must be refused before broadcast (verify already reads the balance; settle must too)."""
    empty = Account.create()
    assert devchain.balance(empty.address) == 0
    with facilitating.client() as client:
        offer = offer_of(client.get("/quotes/EMPTY"))
        signed = Payer(empty.key.hex()).sign(offer.accepts[0], resource=offer.resource).to_wire()
        verified = client.post("/facilitator/verify", json=facilitator_body(signed, signed["accepted"]))
        assert verified.json()["invalidReason"] == "invalid_exact_evm_insufficient_balance"
        before, pay_to = settlement_account(devchain), devchain.balance(PAY_TO)
        settled = client.post("/facilitator/settle", json=facilitator_body(signed, signed["accepted"]))
    assert settled.status_code == 200 and settled.json()["success"] is False, settled.text
    assert settled.json()["errorReason"] == "invalid_exact_evm_insufficient_balance"
    assert devchain.balance(PAY_TO) == pay_to
    assert settlement_account(devchain) == before, "a worthless authorization was broadcast on our gas"


def test_the_served_facilitator_does_not_pay_gas_for_strangers_transfers_by_default(
    start_gateway: GatewayFactory, devchain: Devchain
) -> None:
    """serve_facilitator on, no facilitator_pay_to: a griefer moves 1 unit between two of its own
    accounts (neither zero nor a self-transfer) and the gateway pays the gas. The only payees this
    gateway has a reason to settle for are its catalog's."""
    gateway = start_gateway(serve_facilitator=True)
    stranger = devchain.address(PAYER + 1)
    assert stranger.lower() not in {o.terms.pay_to.lower() for t in gateway.catalogs.tools for o in t.offers}
    with gateway.client() as client:
        requirements = {**offer_of(client.get("/quotes/GRIEF")).accepts[0].to_wire(), "payTo": stranger, "amount": "1"}
        signed = Payer(devchain.key(PAYER)).sign(PaymentRequirements.model_validate(requirements)).to_wire()
        before, balance = settlement_account(devchain), devchain.balance(stranger)
        settled = client.post("/facilitator/settle", json=facilitator_body(signed, requirements))
    assert settled.status_code == 200
    assert (settled.json()["success"], settled.json().get("errorReason")) == (False, "pay_to_not_allowed"), settled.text
    assert devchain.balance(stranger) == balance
    assert settlement_account(devchain) == before, "the gateway paid gas for a transfer to a stranger"


def test_the_served_facilitator_does_not_pay_gas_to_move_a_griefers_own_token_to_our_payee(
    facilitating: RunningGateway, devchain: Devchain
) -> None:
    """The allow-list is on payTo only: any EIP-3009 contract is accepted as the asset. A griefer
    deploys a worthless token once, then every 'payment' of it to our payee settles on our gas."""
    griefer = Account.create()
    devchain.w3.provider.make_request("anvil_setBalance", [griefer.address, hex(10**18)])  # type: ignore[arg-type]
    junk = deploy_token(devchain.deployment.rpc_url, griefer.key.hex(), name="Junk", symbol="JNK", version="1")
    mint(devchain.deployment.rpc_url, junk, [griefer.address], 10**12, minter_key=griefer.key.hex())
    with facilitating.client() as client:
        requirements = {**offer_of(client.get("/quotes/JUNK")).accepts[0].to_wire(), "asset": junk,
                        "extra": {"name": "Junk", "version": "1"}}
        signed = Payer(griefer.key.hex()).sign(PaymentRequirements.model_validate(requirements)).to_wire()
        before = settlement_account(devchain)
        settled = client.post("/facilitator/settle", json=facilitator_body(signed, requirements))
    assert settled.status_code == 200
    assert settled.json()["success"] is False, f"a junk token's transfer was settled on our gas: {settled.text}"
    assert settlement_account(devchain) == before


# -- MCP: a payment buys its own request only, whatever the surface ------------------------------


def test_a_payment_moved_across_surfaces_tools_or_arguments_buys_nothing_more(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    payer = devchain.address(PAYER)
    # 1. Settled over HTTP for AAPL, then presented over MCP for another symbol and another tool.
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/AAPL"))
        signed = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        paid = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": encode_header(signed)})
    assert paid.status_code == 200, paid.text
    balances = devchain.balance(payer), devchain.balance(PAY_TO)

    other_symbol = asyncio.run(mcp_call(gateway.url, "get_quote", {"symbol": "MSFT"}, signed))
    other_tool = asyncio.run(mcp_call(gateway.url, "get_weather", {"city": "Lisbon"}, signed))
    for refused in (other_symbol, other_tool):
        assert refused.is_error, refused
        text = json.dumps(refused.structured_content) + json.dumps([c.model_dump() for c in refused.content])
        assert paid.json()["as_of"] not in text and f'"{paid.json()["price"]}"' not in text  # nothing of AAPL's quote
        assert PaymentRequired.model_validate(refused.structured_content).accepts  # a fresh offer, nothing served
        assert "x402/payment-response" not in (refused.meta or {})
    assert upstream_hits(upstream, "GET /api/v1/quote/MSFT") == 0
    # The same request over MCP is the payer's resend: the answer it bought, not charged again.
    resent = asyncio.run(mcp_call(gateway.url, "get_quote", {"symbol": "AAPL"}, signed))
    assert not resent.is_error and resent.structured_content == paid.json()
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1

    # 2. A fresh payment for the cheaper tool (get_weather, 0.001) on the dearer one (create_order).
    weather = mcp_offer(gateway.url, "get_weather", {"city": "Lisbon"})
    cheap = Payer(devchain.key(PAYER)).sign(weather.accepts[0], resource=weather.resource).to_wire()
    for name, arguments in (("get_quote", {"symbol": "IBM"}), ("create_order", {"symbol": "IBM", "quantity": 1})):
        dear = asyncio.run(mcp_call(gateway.url, name, arguments, cheap))
        assert dear.is_error and "x402/payment-response" not in (dear.meta or {}), dear
        assert PaymentRequired.model_validate(dear.structured_content).accepts  # a fresh offer, nothing served
    assert not devchain.authorization_state(payer, cheap["payload"]["authorization"]["nonce"])
    assert upstream_hits(upstream, "GET /api/v1/quote/IBM") == 0
    assert upstream_hits(upstream, "POST /api/v1/orders") == 0
    assert (devchain.balance(payer), devchain.balance(PAY_TO)) == balances
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.path == "/quotes/AAPL"


# -- MCP: the client's headers stay at the gateway, the upstream's forgeries too -----------------


@pytest.fixture
def recording_gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
                      recorder: tuple[ThreadServer, list[Received]]) -> tuple[RunningGateway, list[Received]]:
    recorder[1].clear()
    schema = "    input_schema: {type: object, properties: {id: {type: string, pattern: \"^[0-9]+$\"}}}\n"
    tools = "".join(
        f"  - name: {name}\n    description: d\n    method: GET\n    path: {path}\n    price: \"0.001\"\n"
        f"    upstream_path: {target}\n{schema}"
        for name, path, target in (("lookup", "/lookup/{id}", "/rec/lookup/{id}"), ("spoofed", "/spoofed", "/spoof"),
                                   ("broken", "/broken", "/spoof-error"))
    )
    catalog = tmp_path / "recording.yaml"
    catalog.write_text(f"""
catalog: 1
owner: review-test
payment: {{network: "{NETWORK}", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{recorder[0].url}", timeout_seconds: 5}}
tools:
{tools}""")
    return start_gateway(catalog), recorder[1]


def paid_over_mcp(url: str, devchain: Devchain, name: str, arguments: dict[str, Any],
                  headers: dict[str, str] | None = None) -> types.CallToolResult:
    offer = mcp_offer(url, name, arguments)
    payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
    return asyncio.run(mcp_call(url, name, arguments, payment, headers))


def test_the_mcp_clients_headers_never_reach_the_upstream(
    recording_gateway: tuple[RunningGateway, list[Received]], devchain: Devchain
) -> None:
    gateway, received = recording_gateway
    smuggled = {
        "Authorization": "Bearer agent-secret", "Cookie": "session=agent", "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Host": "internal.example", "X-Real-IP": "10.0.0.1", "Proxy-Authorization": "Basic eA==",
        "PAYMENT-SIGNATURE": "eyJ9", "X402GW-Replay": "true", "Forwarded": "for=10.0.0.1",
    }
    result = paid_over_mcp(gateway.url, devchain, "lookup", {"id": "42"}, smuggled)
    assert not result.is_error, result
    [got] = received
    assert (got.method, got.path, got.query) == ("GET", "/rec/lookup/42", "")
    names = {name for name, _ in got.headers}
    for name in smuggled:
        assert name.lower() not in names, name
    assert "agent-secret" not in json.dumps(got.headers) and "10.0.0.1" not in json.dumps(got.headers)
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED
    assert result.meta["x402/payment-response"]["transaction"] == row.tx_hash


@pytest.mark.parametrize(("tool", "settled"), [("spoofed", True), ("broken", False)])
def test_an_upstream_cannot_forge_the_mcp_receipt_on_success_or_error(
    recording_gateway: tuple[RunningGateway, list[Received]], devchain: Devchain, tool: str, settled: bool
) -> None:
    gateway, _ = recording_gateway
    before = devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)
    result = paid_over_mcp(gateway.url, devchain, tool, {})
    meta = result.meta or {}
    assert "x402gw/replay" not in json.dumps(meta).lower() and "forged" not in json.dumps(meta)
    assert "x402gw-refund" not in json.dumps(result.structured_content).lower()
    [row] = gateway.ledger.all()
    if settled:
        assert not result.is_error and meta["x402/payment-response"]["transaction"] == row.tx_hash
        assert devchain.w3.eth.get_transaction_receipt(row.tx_hash)["status"] == 1
        assert devchain.balance(PAY_TO) == before[1] + 1000
    else:  # a 500: nothing charged, and no receipt of any kind in the answer
        assert result.is_error and meta.get("x402gw/status") == 500
        assert "x402/payment-response" not in meta and "x402gw/receipt" not in meta
        assert row.state == PaymentState.VOIDED and row.tx_hash is None
        assert (devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)) == before


# -- refunds: one failed upfront call is refunded once, whoever races it ------------------------

UPFRONT_TOOL = """
  - name: build_report
    description: Build a report (side effects, settles first).
    method: GET
    path: /upfront/reports/{report_id}
    upstream_path: /reports/{report_id}
    price: "0.004"
    settle: upfront
"""


def test_one_failed_upfront_payment_raced_over_http_and_mcp_is_refunded_exactly_once(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog, refund_key=devchain.key(9))  # the payee's account pays refunds back
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        offer = offer_of(client.get("/upfront/reports/500"))  # the sample upstream fails report 500
    signed = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
    before = devchain.balance(payer), devchain.balance(PAY_TO)

    async def race() -> list[Any]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            header = {"PAYMENT-SIGNATURE": encode_header(signed)}
            return list(await asyncio.gather(
                *(http.get("/upfront/reports/500", headers=header) for _ in range(3)),
                *(mcp_call(gateway.url, "build_report", {"report_id": "500"}, signed) for _ in range(3)),
            ))

    answers = asyncio.run(race())
    for answer in answers:  # none is a success; at most one carries the refund
        assert (answer.status_code >= 400) if isinstance(answer, httpx.Response) else answer.is_error
    # and a late resend of each kind, after the race
    with gateway.client() as client:
        late = client.get("/upfront/reports/500", headers={"PAYMENT-SIGNATURE": encode_header(signed)})
    late_mcp = asyncio.run(mcp_call(gateway.url, "build_report", {"report_id": "500"}, signed))
    assert late.status_code == 409 and late.json()["error"] == "payment_already_settled", late.text
    assert late_mcp.is_error and late_mcp.structured_content["error"] == "payment_already_settled"

    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.refund_owed == 4000
    assert row.refund_tx is not None and row.refunded_at is not None
    assert devchain.w3.eth.get_transaction_receipt(row.refund_tx)["status"] == 1
    assert (devchain.balance(payer), devchain.balance(PAY_TO)) == before  # paid once, refunded once
    assert upstream_hits(upstream, "GET /reports/500") == 1
    refunds = [a for a in answers if isinstance(a, httpx.Response) and "x402gw-refund" in a.headers]
    refunds += [a for a in answers if not isinstance(a, httpx.Response)
                and (a.structured_content or {}).get("refund") == "refunded"]
    assert len(refunds) == 1


# -- MCP transport: what it buffers is bounded like every other request -------------------------


def test_an_oversized_mcp_request_is_refused_before_it_is_buffered(start_gateway: GatewayFactory) -> None:
    """The paid path refuses bodies over max_body_bytes (413); /mcp reads any body whole into
    memory first (a griefer's N concurrent huge bodies), and only then parses it."""
    gateway = start_gateway(max_body_bytes=65_536)
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": {"pad": "x" * 2_000_000}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with gateway.client() as client:
        big = client.post("/mcp", content=json.dumps(message).encode(), headers=headers)
        paid_path = client.post("/orders", content=b'{"pad":"' + b"x" * 2_000_000 + b'"}', headers=headers)
    assert paid_path.status_code == 413, paid_path.text
    assert big.status_code == 413, f"/mcp buffered and answered a 2 MB body: {big.status_code} {big.text[:200]}"
