"""x402 over MCP end to end: the official ``mcp`` client lists the tools and pays for calls on anvil."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.wire import PaymentRequired
from tests.conftest import PAY_TO, Devchain, RunningGateway, upstream_hits

PAYER = 6  # anvil account used by this module's payments
T = TypeVar("T")


def with_session(gateway: RunningGateway, work: Callable[[ClientSession], Awaitable[T]]) -> T:
    async def run() -> T:
        async with (
            streamable_http_client(f"{gateway.url}/mcp") as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await work(session)

    return asyncio.run(run())


def pay_over_mcp(
    session: ClientSession, devchain: Devchain, name: str, arguments: dict[str, Any], payer: int = PAYER
) -> Awaitable[tuple[types.CallToolResult, types.CallToolResult, dict[str, Any]]]:
    async def run() -> tuple[types.CallToolResult, types.CallToolResult, dict[str, Any]]:
        unpaid = await session.call_tool(name, arguments)
        assert unpaid.is_error, unpaid
        offer = PaymentRequired.model_validate(unpaid.structured_content)
        payment = Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        paid = await session.call_tool(name, arguments, meta={"x402/payment": payment})
        return unpaid, paid, payment

    return run()


def test_tools_list_is_the_catalog_with_prices(gateway: RunningGateway) -> None:
    listed = with_session(gateway, lambda s: s.list_tools())
    by_name = {tool.name: tool for tool in listed.tools}
    assert listed.tools[0].name == "search_tools" and listed.next_cursor is None  # free, then one page
    assert set(by_name) - {"search_tools"} == {tool.name for tool in gateway.catalogs.tools}
    for tool in gateway.catalogs.tools:
        mcp_tool = by_name[tool.name]
        assert mcp_tool.input_schema == tool.input_schema
        assert mcp_tool.meta is not None
        assert mcp_tool.meta["x402/price"]["atomic"] == str(tool.price_atomic)
        assert mcp_tool.meta["x402/price"]["payTo"] == PAY_TO
        assert str(tool.price) in (mcp_tool.description or "")


def test_paid_tool_call_over_mcp_settles_on_chain(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    payer = devchain.address(PAYER)
    before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)

    unpaid, paid, payment = with_session(
        gateway, lambda s: pay_over_mcp(s, devchain, "get_quote", {"symbol": "AAPL"})
    )

    # unpaid: isError, the PaymentRequired in structuredContent and, as JSON text, in content[0]
    offer = PaymentRequired.model_validate(unpaid.structured_content)
    assert offer.accepts[0].amount == "2000" and offer.accepts[0].pay_to == PAY_TO
    assert offer.resource.url == f"{gateway.url}/quotes/AAPL"
    assert isinstance(unpaid.content[0], types.TextContent)
    assert PaymentRequired.model_validate_json(unpaid.content[0].text) == offer
    assert "bazaar" in (offer.extensions or {})

    # paid: the tool's answer and the settlement receipt in _meta
    assert not paid.is_error, paid
    assert paid.structured_content["symbol"] == "AAPL"
    assert paid.meta is not None
    receipt = paid.meta["x402/payment-response"]
    assert receipt["success"] is True and receipt["payer"] == payer
    assert receipt["transaction"].startswith("0x")
    assert devchain.w3.eth.get_transaction_receipt(receipt["transaction"])["status"] == 1
    assert devchain.balance(payer) == before_payer - 2000
    assert devchain.balance(PAY_TO) == before_pay_to + 2000
    assert devchain.authorization_state(payer, payment["payload"]["authorization"]["nonce"]) is True
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == receipt["transaction"]
    assert (row.amount, row.payer, row.tool) == (2000, payer, "get_quote")
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1


def test_resent_mcp_payment_is_not_charged_twice(gateway: RunningGateway, devchain: Devchain, upstream: str) -> None:
    payer = devchain.address(PAYER)

    async def work(session: ClientSession) -> tuple[types.CallToolResult, types.CallToolResult, int]:
        _, paid, payment = await pay_over_mcp(session, devchain, "get_quote", {"symbol": "IBM"})
        after_first = devchain.balance(payer)
        again = await session.call_tool("get_quote", {"symbol": "IBM"}, meta={"x402/payment": payment})
        return paid, again, after_first

    paid, again, after_first = with_session(gateway, work)
    assert not paid.is_error and not again.is_error
    assert again.structured_content == paid.structured_content
    assert again.meta["x402/payment-response"]["transaction"] == paid.meta["x402/payment-response"]["transaction"]
    assert devchain.balance(payer) == after_first
    assert upstream_hits(upstream, "GET /api/v1/quote/IBM") == 1
    assert [row.state for row in gateway.ledger.all()] == [PaymentState.SETTLED]


def test_post_tool_over_mcp_sends_a_json_body(gateway: RunningGateway, devchain: Devchain) -> None:
    _, paid, _ = with_session(
        gateway, lambda s: pay_over_mcp(s, devchain, "create_order", {"symbol": "MSFT", "quantity": 3})
    )
    assert not paid.is_error, paid
    assert paid.meta["x402gw/status"] == 201
    assert paid.structured_content["symbol"] == "MSFT"
    assert paid.meta["x402/payment-response"]["success"] is True


def test_refusals_over_mcp_say_what_to_do_next(gateway: RunningGateway, devchain: Devchain) -> None:
    async def work(session: ClientSession) -> list[types.CallToolResult]:
        bad_args = await session.call_tool("create_order", {"symbol": "MSFT", "quantity": 0})
        unknown = await session.call_tool("no_such_tool", {})
        unpaid = await session.call_tool("get_quote", {"symbol": "SAP"})
        offer = PaymentRequired.model_validate(unpaid.structured_content)
        wrong = Payer(devchain.key(PAYER)).sign(offer.accepts[0], overrides={"value": 1}).to_wire()
        underpaid = await session.call_tool("get_quote", {"symbol": "SAP"}, meta={"x402/payment": wrong})
        not_an_object = await session.call_tool("get_quote", {"symbol": "SAP"}, meta={"x402/payment": "0xdead"})
        no_path_arg = await session.call_tool("get_quote", {})
        return [bad_args, unknown, underpaid, not_an_object, no_path_arg]

    bad_args, unknown, underpaid, not_an_object, no_path_arg = with_session(gateway, work)
    assert no_path_arg.is_error and no_path_arg.structured_content["next"] == {"action": "fix_arguments", "fields": ["symbol"]}
    assert bad_args.is_error and bad_args.structured_content["error"] == "invalid_arguments"
    assert bad_args.structured_content["next"] == {"action": "fix_arguments", "fields": ["quantity"]}
    assert unknown.is_error and unknown.structured_content["next"]["action"] == "discover"
    # verification failed: isError with the PaymentRequired again, naming the reason
    assert underpaid.is_error
    again = PaymentRequired.model_validate(underpaid.structured_content)
    assert again.error == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert not_an_object.is_error and not_an_object.structured_content["next"]["action"] == "fix_payment"
    assert gateway.ledger.all() == []
