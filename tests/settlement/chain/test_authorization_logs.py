"""``find_authorization_used`` against a real anvil: a payer's cancel is found (its receipt has no
transfer, so a payment under that nonce fails: nothing moved), and a node that answers
``eth_getLogs`` with nothing while the token says the nonce is used makes the outcome unknown
(``ChainUnavailable``), never "used elsewhere" (a payment failed while its money moved)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.chain.client import JsonRpcChain
from settlement.chain.receipts import Receipt
from settlement.errors import ChainUnavailable
from tests.conftest import Devchain
from tests.support.chain_actions import cancel_authorization, fresh_payer

pytestmark = pytest.mark.e2e


@pytest.fixture
def logless_node(devchain: Devchain) -> Iterator[str]:
    """anvil behind a proxy whose eth_getLogs always answers "no logs" (a node that does not hold
    the range it is asked, answering as if it did)."""
    client = httpx.Client(timeout=30)

    def answer(call: dict[str, object]) -> object:
        if call.get("method") == "eth_getLogs":
            return {"jsonrpc": "2.0", "id": call.get("id"), "result": []}
        return client.post(devchain.anvil.rpc_url, json=call).json()

    async def proxy(request: Request) -> Response:
        body = json.loads(await request.body())
        answers = [answer(call) for call in body] if isinstance(body, list) else answer(body)
        return Response(json.dumps(answers), media_type="application/json")

    with ThreadServer(Starlette(routes=[Route("/", proxy, methods=["POST"])])) as server:
        yield server.url
    client.close()


def _find(rpc_url: str, token: str, payer: str, nonce_hex: str) -> Receipt | None:
    async def run() -> Receipt | None:
        chain = JsonRpcChain(rpc_url, 31337, None)
        return await chain.find_authorization_used(token, payer, bytes.fromhex(nonce_hex[2:]))

    return asyncio.run(run())


def test_a_cancelled_authorization_is_found_and_moved_nothing(devchain: Devchain) -> None:
    deployment = devchain.deployment
    key = fresh_payer(devchain.w3, devchain.token, devchain.key(2), 1_000)
    payer = devchain.w3.eth.account.from_key(key).address
    nonce = "0x" + os.urandom(32).hex()
    cancel = cancel_authorization(devchain.w3, devchain.token, deployment.token.name, deployment.token.version, key, nonce)
    assert devchain.authorization_state(payer, nonce)
    found = _find(devchain.anvil.rpc_url, devchain.token, payer, nonce)
    assert found is not None and found.tx_hash == "0x" + cancel["transactionHash"].hex().removeprefix("0x")
    assert not found.has_authorization_used(devchain.token, payer, bytes.fromhex(nonce[2:]))


def test_a_used_nonce_without_any_log_is_unknown(devchain: Devchain, logless_node: str) -> None:
    deployment = devchain.deployment
    key = fresh_payer(devchain.w3, devchain.token, devchain.key(2), 1_000)
    payer = devchain.w3.eth.account.from_key(key).address
    nonce = "0x" + os.urandom(32).hex()
    cancel_authorization(devchain.w3, devchain.token, deployment.token.name, deployment.token.version, key, nonce)
    with pytest.raises(ChainUnavailable) as unknown:
        _find(logless_node, devchain.token, payer, nonce)
    assert unknown.value.code == "authorization_use_not_found"
