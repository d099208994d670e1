"""Interoperability with the official x402 SDK (2.25.0), both ways, on a real anvil:

1. the SDK's resource-server middleware uses our facilitator API (``gateway.surfaces.facilitator_api``);
2. our gateway uses the SDK's facilitator over HTTP (``settlement.schemes.remote.RemoteFacilitator``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_typing import HexStr
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from x402 import x402Client, x402Facilitator, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmScheme, ExactEvmServerScheme, register_exact_evm_facilitator
from x402.schemas import parse_payment_payload, parse_payment_requirements

from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.schemes.remote import RemoteFacilitator
from tests.conftest import PAY_TO, Devchain, GatewayFactory, upstream_hits
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.local_facilitator import local_facilitator_app

NETWORK = "eip155:31337"
SDK_CLIENT_PAYER = 7  # pays the SDK resource server
GATEWAY_PAYER = 1  # pays our gateway through the SDK facilitator
SDK_FACILITATOR_GAS = 8  # the SDK facilitator's own account: never the gateway's settlement key
PRICE = 1500


def _dump(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return data


# ------------------------------------------------------------ 1. SDK resource server → our facilitator


@pytest.fixture
def our_facilitator_url(devchain: Devchain) -> Iterator[str]:
    with ThreadServer(local_facilitator_app(devchain.deployment)) as server:
        yield f"{server.url}/facilitator"


def sdk_resource_server(facilitator_url: str, token: str) -> Starlette:
    server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url)))
    server.register(NETWORK, ExactEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]  # the SDK's own typing
    routes: dict[str, Any] = {
        "GET /paid": {
            "accepts": {
                "scheme": "exact",
                "network": NETWORK,
                "payTo": PAY_TO,
                "price": {"amount": str(PRICE), "asset": token, "extra": {"name": "USD Coin", "version": "2"}},
                "maxTimeoutSeconds": 60,
            },
            "description": "interop demo",
            "mimeType": "application/json",
        }
    }

    async def paid(request: Request) -> Response:
        return JSONResponse({"content": "for paying customers"})

    app = Starlette(routes=[Route("/paid", paid, methods=["GET"])])
    # The middleware fetches /supported from our facilitator here, when it is created.
    app.add_middleware(BaseHTTPMiddleware, dispatch=payment_middleware(routes, server))
    return app


def test_sdk_resource_server_settles_through_our_facilitator(our_facilitator_url: str, devchain: Devchain) -> None:
    payer = Account.from_key(devchain.key(SDK_CLIENT_PAYER))
    client = x402Client()
    client.register(NETWORK, ExactEvmScheme(signer=payer))
    client.set_spend_controls({"allowed_assets": [{"network": NETWORK, "asset": devchain.token}]})
    before_payer, before_pay_to = devchain.balance(payer.address), devchain.balance(PAY_TO)

    async def call(url: str) -> tuple[int, Any, Any]:
        async with x402HttpxClient(client, timeout=30) as http:
            response = await http.get(f"{url}/paid")
            settle = x402HTTPClient(client).get_payment_settle_response(response.headers.get)
            return response.status_code, response.json(), settle

    with ThreadServer(sdk_resource_server(our_facilitator_url, devchain.token)) as resource:
        status, body, settle = asyncio.run(call(resource.url))
    assert status == 200, body
    assert body == {"content": "for paying customers"}
    assert settle.success is True and settle.transaction.startswith("0x") and settle.network == NETWORK
    chain_receipt = devchain.w3.eth.get_transaction_receipt(HexStr(settle.transaction))
    assert chain_receipt["status"] == 1
    assert chain_receipt["from"] == devchain.deployment.deployer  # our facilitator's settlement account
    assert devchain.balance(payer.address) == before_payer - PRICE
    assert devchain.balance(PAY_TO) == before_pay_to + PRICE


# ------------------------------------------------------------ 2. our gateway → SDK facilitator


def sdk_facilitator_app(devchain: Devchain) -> Starlette:
    """The SDK's x402Facilitator behind the standard HTTP API (as its e2e facilitator serves it)."""
    facilitator = x402Facilitator()
    signer = FacilitatorWeb3Signer(private_key=devchain.key(SDK_FACILITATOR_GAS), rpc_url=devchain.anvil.rpc_url)
    register_exact_evm_facilitator(facilitator, signer, networks=NETWORK)

    async def supported(request: Request) -> Response:
        return JSONResponse(_dump(facilitator.get_supported()))

    async def parsed(request: Request) -> tuple[Any, Any]:
        body = await request.json()
        return (
            parse_payment_payload(body["paymentPayload"]),
            parse_payment_requirements(body["x402Version"], body["paymentRequirements"]),
        )

    async def verify(request: Request) -> Response:
        payload, requirements = await parsed(request)
        return JSONResponse(_dump(await facilitator.verify(payload, requirements)))

    async def settle(request: Request) -> Response:
        payload, requirements = await parsed(request)
        return JSONResponse(_dump(await facilitator.settle(payload, requirements)))

    return Starlette(
        routes=[
            Route("/supported", supported, methods=["GET"]),
            Route("/verify", verify, methods=["POST"]),
            Route("/settle", settle, methods=["POST"]),
        ]
    )


@pytest.fixture
def sdk_facilitator_url(devchain: Devchain) -> Iterator[str]:
    with ThreadServer(sdk_facilitator_app(devchain)) as server:
        yield server.url


def test_our_gateway_settles_through_the_sdk_facilitator(
    start_gateway: GatewayFactory, sdk_facilitator_url: str, devchain: Devchain, upstream: str
) -> None:
    async def supported() -> dict[str, Any]:
        remote = RemoteFacilitator(sdk_facilitator_url)
        try:
            return await remote.fetch_supported()
        finally:
            await remote.close()

    kinds = asyncio.run(supported())["kinds"]
    assert any(k["x402Version"] == 2 and k["scheme"] == "exact" and k["network"] == NETWORK for k in kinds)

    gateway = start_gateway(facilitator=RemoteFacilitator(sdk_facilitator_url))
    payer = devchain.address(GATEWAY_PAYER)
    before_payer, before_pay_to = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=GATEWAY_PAYER)
    assert paid.status_code == 200, paid.text
    assert paid.json()["symbol"] == "AAPL"
    receipt = receipt_of(paid)
    assert receipt.success and receipt.transaction.startswith("0x") and receipt.payer == payer
    chain_receipt = devchain.w3.eth.get_transaction_receipt(HexStr(receipt.transaction))
    assert chain_receipt["status"] == 1
    assert chain_receipt["from"] == devchain.address(SDK_FACILITATOR_GAS)
    assert devchain.balance(payer) == before_payer - 2000
    assert devchain.balance(PAY_TO) == before_pay_to + 2000
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == receipt.transaction
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1
