"""Several RPC URLs for one chain: reads go through the next URL when one is dead, rate-limited or
answers a proxy's error page; a JSON-RPC error is the node's answer, not a failure; per-URL health
tells which is down (redacted: a path may hold an API key); a URL that failed is asked last."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.chain.client import JsonRpcChain
from settlement.chain.rpc import RpcError, redact_url
from settlement.errors import ChainUnavailable
from tests.conftest import Devchain
from tests.support.facilitator_double import closed_port_url


class BadNode:
    """Answers every JSON-RPC request with one fixed HTTP answer, and counts them."""

    def __init__(self, status: int, body: str, media_type: str) -> None:
        self.hits = 0

        async def rpc(request: Request) -> Response:
            self.hits += 1
            return Response(body, status_code=status, media_type=media_type)

        self.server = ThreadServer(Starlette(routes=[Route("/{path:path}", rpc, methods=["POST"])]))


@pytest.fixture
def bad_node(request: pytest.FixtureRequest) -> Iterator[BadNode]:
    node = BadNode(*request.param)
    node.server.start()
    yield node
    node.server.stop()


def run(chain: JsonRpcChain, work: Any) -> Any:
    async def go() -> Any:
        try:
            return await work(chain)
        finally:
            await chain.close()

    return asyncio.run(go())


def test_reads_fail_over_and_health_names_the_dead_url(devchain: Devchain) -> None:
    dead = closed_port_url() + "/v2/SECRET-API-KEY"
    chain = JsonRpcChain([dead, devchain.anvil.rpc_url], 31337, None)

    async def work(chain: JsonRpcChain) -> Any:
        first = await chain.remote_chain_id()
        metadata = await chain.token_metadata(devchain.token)
        return first, metadata, chain.rpc_health()

    chain_id, metadata, health = run(chain, work)
    assert chain_id == 31337 and metadata == ("USD Coin", "2", 6)
    assert [h["state"] for h in health] == ["down", "up"]
    assert health[0]["url"] == redact_url(dead) and "SECRET" not in str(health)
    # The dead URL failed once and was asked last afterwards (every later read went straight through).
    assert health[0]["failures"] == 1 and health[0]["lastError"] == "ClientConnectorError"


@pytest.mark.parametrize(
    "bad_node",
    [(429, '{"error":"rate limited"}', "application/json"), (502, "<html>502 Bad Gateway</html>", "text/html")],
    indirect=True,
)
def test_rate_limited_or_broken_proxy_fails_over(devchain: Devchain, bad_node: BadNode) -> None:
    chain = JsonRpcChain([bad_node.server.url, devchain.anvil.rpc_url], 31337, None)
    assert run(chain, lambda c: c.remote_chain_id()) == 31337
    assert bad_node.hits == 1
    assert [h["state"] for h in chain.rpc_health()] == ["down", "up"]


def test_a_json_rpc_error_is_an_answer_not_a_failover(devchain: Devchain) -> None:
    chain = JsonRpcChain([devchain.anvil.rpc_url, closed_port_url()], 31337, None)

    async def work(chain: JsonRpcChain) -> Any:
        with pytest.raises(RpcError):
            await chain._rpc("eth_noSuchMethod", [])
        return chain.rpc_health()

    assert [h["state"] for h in run(chain, work)] == ["up", "unknown"]


def test_every_url_dead_is_chain_unavailable() -> None:
    chain = JsonRpcChain([closed_port_url(), closed_port_url()], 31337, None)

    async def work(chain: JsonRpcChain) -> Any:
        with pytest.raises(ChainUnavailable):
            await chain.remote_chain_id()
        return chain.rpc_health()

    assert [h["state"] for h in run(chain, work)] == ["down", "down"]


def test_a_down_url_is_asked_first_again_after_its_cooldown(devchain: Devchain) -> None:
    now = [1000.0]
    chain = JsonRpcChain([closed_port_url(), devchain.anvil.rpc_url], 31337, None)
    chain._clock = lambda: now[0]

    async def work(chain: JsonRpcChain) -> Any:
        await chain.remote_chain_id()
        await chain.remote_chain_id()  # the dead one is skipped (asked last): still one failure
        failures_before = chain.rpc_health()[0]["failures"]
        now[0] += 31
        await chain.remote_chain_id()  # cooled down: asked first again, fails again
        return failures_before, chain.rpc_health()[0]["failures"]

    assert run(chain, work) == (1, 2)


def test_one_url_string_still_works() -> None:
    chain = JsonRpcChain("http://127.0.0.1:1", 1, None)
    assert chain.rpc_urls == ["http://127.0.0.1:1"] and chain.rpc_url == "http://127.0.0.1:1"
    # as the settings keep several: separated by spaces
    assert JsonRpcChain("http://a/v2/k  http://b", 1, None).rpc_urls == ["http://a/v2/k", "http://b"]
    with pytest.raises(ValueError):
        JsonRpcChain([], 1, None)


@pytest.mark.parametrize("bad_node", [(200, "", "application/json"), (200, " \n", "application/json")], indirect=True)
def test_an_empty_reply_is_no_answer_from_a_node_that_is_up(devchain: Devchain, bad_node: BadNode) -> None:
    """An empty body is no JSON-RPC answer (what aiohttp's ``json()`` read it as, before the
    transport parsed the bytes itself): the caller learns the chain is unavailable, the node is not
    taken for down, and the next URL is not asked."""
    chain = JsonRpcChain([bad_node.server.url, devchain.anvil.rpc_url], 31337, None)

    async def work(chain: JsonRpcChain) -> Any:
        with pytest.raises(ChainUnavailable, match="not a JSON-RPC answer"):
            await chain.remote_chain_id()
        return chain.rpc_health()

    assert [h["state"] for h in run(chain, work)] == ["up", "unknown"]
    assert bad_node.hits == 1
