"""The reference agent's own checks, without a gateway: token facts from an RPC that lies, the pinned
list, and which offers it signs (issue 13, finding 3)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.devkit.agent import (
    PayingAgent,
    SpendLimitExceeded,
    TokenUnverifiable,
    UntrustedOffer,
    pinned_token,
    read_token_facts,
)
from gateway.devkit.devchain import ANVIL_KEYS
from gateway.ops.serving import ThreadServer
from settlement.chain.client import SEL_DECIMALS, SEL_NAME, SEL_VERSION
from settlement.x402.wire import PaymentRequired, PaymentRequirements, ResourceInfo

BASE_SEPOLIA = "eip155:84532"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"


def fake_rpc(chain_id: int, name: str, version: str, decimals: int, code: str = "0x6080") -> ThreadServer:
    """A JSON-RPC node on loopback that answers what it is told to (a lying or wrong node)."""

    async def rpc(request: Request) -> JSONResponse:
        call = await request.json()
        method, params = call["method"], call["params"]
        result: Any
        if method == "eth_chainId":
            result = hex(chain_id)
        elif method == "eth_getCode":
            result = code
        elif method == "eth_call":
            data = bytes.fromhex(params[0]["data"][2:])
            answers = {SEL_NAME: abi_encode(["string"], [name]), SEL_VERSION: abi_encode(["string"], [version]),
                       SEL_DECIMALS: abi_encode(["uint8"], [decimals])}
            if data[:4] not in answers:
                return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "error": {"code": 3, "message": "execution reverted"}})
            result = "0x" + answers[data[:4]].hex()
        else:
            return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "error": {"code": -32601, "message": method}})
        return JSONResponse({"jsonrpc": "2.0", "id": call["id"], "result": result})

    return ThreadServer(Starlette(routes=[Route("/", rpc, methods=["POST"])]))


def test_token_facts_come_from_the_chain() -> None:
    with fake_rpc(84532, "USDC", "2", 6) as node:
        facts = asyncio.run(read_token_facts(node.url + "/", USDC, network=BASE_SEPOLIA))
    assert (facts.network, facts.address, facts.name, facts.version, facts.decimals) == (BASE_SEPOLIA, USDC, "USDC", "2", 6)


def test_a_node_that_contradicts_the_pinned_list_is_not_believed() -> None:
    with fake_rpc(84532, "USDC", "2", 18) as node, pytest.raises(TokenUnverifiable, match="pinned list says"):
        asyncio.run(read_token_facts(node.url + "/", USDC))


def test_a_node_on_another_chain_is_refused() -> None:
    with fake_rpc(8453, "USDC", "2", 6) as node, pytest.raises(TokenUnverifiable, match="chain id 8453"):
        asyncio.run(read_token_facts(node.url + "/", USDC, network=BASE_SEPOLIA))


def test_an_address_without_code_is_no_token() -> None:
    with fake_rpc(84532, "USDC", "2", 6, code="0x") as node, pytest.raises(TokenUnverifiable, match="no contract"):
        asyncio.run(read_token_facts(node.url + "/", USDC))


def test_pinned_tokens() -> None:
    facts = pinned_token(BASE_SEPOLIA)
    assert facts is not None and (facts.address, facts.name, facts.version, facts.decimals) == (USDC, "USDC", "2", 6)
    assert pinned_token("base") is not None and pinned_token("base").name == "USD Coin"  # type: ignore[union-attr]
    assert pinned_token(BASE_SEPOLIA, PAY_TO) is None
    assert pinned_token("eip155:31337") is None


def offer(**changes: Any) -> PaymentRequired:
    fields: dict[str, Any] = dict(scheme="exact", network=BASE_SEPOLIA, amount="2000", asset=USDC, pay_to=PAY_TO,
                                  max_timeout_seconds=60, extra={"name": "USDC", "version": "2"})
    fields.update(changes)
    return PaymentRequired(resource=ResourceInfo(url="http://gw/x"), accepts=[PaymentRequirements(**fields)])


def agent(**limits: int) -> PayingAgent:
    token = pinned_token(BASE_SEPOLIA)
    assert token is not None
    return PayingAgent(ANVIL_KEYS[1], token, **{"max_spend_atomic": 5000, **limits})


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"network": "eip155:8453"}, UntrustedOffer, "not the agent's"),
        ({"network": "base-sepolia"}, UntrustedOffer, "not the agent's"),
        ({"asset": PAY_TO}, UntrustedOffer, "not the agent's token"),
        ({"extra": {"name": "USD Coin", "version": "2"}}, UntrustedOffer, "the chain says"),
        ({"extra": {"name": "USDC", "version": "2", "assetTransferMethod": "permit2"}}, UntrustedOffer, "permit2"),
        ({"extra": None}, UntrustedOffer, "the chain says"),
        ({"scheme": "upto"}, UntrustedOffer, "scheme"),
        ({"pay_to": "0x0000000000000000000000000000000000000000"}, UntrustedOffer, "not an address"),
        ({"max_timeout_seconds": 0}, UntrustedOffer, "maxTimeoutSeconds"),
        ({"amount": "5001"}, SpendLimitExceeded, "spend limit"),
    ],
)
def test_offers_the_agent_will_not_sign(changes: dict[str, Any], error: type[Exception], message: str) -> None:
    paying = agent()
    with pytest.raises(error, match=message):
        paying.choose(offer(**changes))
    with pytest.raises(error, match=message):
        paying.sign(offer(**changes).accepts[0])
    assert paying.signed == [] and paying.spent_atomic == 0


def test_advertised_payee_and_price_bind_the_offer() -> None:
    paying = agent()
    with pytest.raises(UntrustedOffer, match="payTo"):
        paying.choose(offer(), expect_pay_to="0x70997970C51812dc3A010C7d01b50e0d17dc79C8")
    with pytest.raises(UntrustedOffer, match="more than the advertised price"):
        paying.choose(offer(amount="2001"), expect_max_amount=2000)
    assert paying.choose(offer(), expect_pay_to=PAY_TO.lower(), expect_max_amount=2000).amount == "2000"


def test_every_signature_counts_and_the_window_is_capped() -> None:
    paying = agent(max_per_call_atomic=2000, max_valid_seconds=90)
    paying._clock = lambda: 1_000_000.0
    payload, record = paying.sign(offer(max_timeout_seconds=86_400).accepts[0])
    assert payload.payload["authorization"]["validBefore"] == str(1_000_000 + 90)
    assert payload.payload["authorization"]["value"] == "2000" and payload.payload["authorization"]["to"] == PAY_TO
    with pytest.raises(SpendLimitExceeded, match="per-call limit"):
        paying.choose(offer(amount="2001"))
    paying.sign(offer().accepts[0])
    assert paying.spent_atomic == 4000 and paying.remaining_atomic == 1000
    with pytest.raises(SpendLimitExceeded, match="0.004 of 0.005 spent"):
        paying.choose(offer(amount="1001"))
    assert paying.choose(offer(amount="1000")).amount == "1000"


@pytest.mark.parametrize("limits", [{"max_spend_atomic": -1}, {"max_spend_atomic": True}, {"max_per_call_atomic": -5}])
def test_limits_are_non_negative_ints(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        agent(**limits)


def test_the_agent_needs_trusted_token_facts() -> None:
    with pytest.raises(TypeError):
        PayingAgent(ANVIL_KEYS[1], {"decimals": 6}, max_spend_atomic=1)  # type: ignore[arg-type]
