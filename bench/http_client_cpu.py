"""CPU of the gateway's outbound HTTP side alone: upstream sends and JSON-RPC batches, in-process, on uvloop as the gateway runs.

    python -m bench.http_client_cpu [--calls 4000] [--concurrency 32] [--rpc-calls 800]

Starts the sample upstream (uvicorn, as ``bench.run`` does) and a fresh anvil, then times, with this
process's CPU (``time.process_time``, the client's side only), ``--calls`` ``AiohttpUpstreamClient.send``
GETs of the bench path at ``--concurrency``, and ``--rpc-calls`` JSON-RPC batches of eight
``eth_call`` s (the batched paid path sends about nine calls a POST on average, most POSTs one or two) through ``JsonRpcChain``.
Prints microseconds of CPU per send and per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench.run import UPSTREAM_PATH, anvil, free_port, process, uvicorn_cmd
from gateway.upstream.transport import AiohttpUpstreamClient
from settlement.chain.client import JsonRpcChain

_CALL = {"to": "0x" + "11" * 20, "data": "0x70a08231" + "00" * 12 + "22" * 20}  # balanceOf


async def _sends(url: str, calls: int, concurrency: int) -> float:
    client = AiohttpUpstreamClient()
    headers = {"accept": "application/json", "x402gw-request-id": "bench"}
    await client.send("GET", url, headers, b"", 10.0, 1 << 20)  # connect outside the timing

    async def worker(n: int) -> None:
        for _ in range(n):
            response = await client.send("GET", url, headers, b"", 10.0, 1 << 20)
            assert response.status == 200, response.status

    started = time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    spent = time.process_time() - started
    await client.close()
    return spent / (calls // concurrency * concurrency)


async def _batches(rpc_url: str, batches: int) -> float:
    chain = JsonRpcChain(rpc_url, 31337, None)
    await chain._rpc("eth_blockNumber", [])

    async def batch() -> None:
        # eight calls made together go out as one batch (one POST)
        await asyncio.gather(*(chain._rpc("eth_call", [_CALL, "latest"]) for _ in range(8)))

    started = time.process_time()
    for _ in range(batches):
        await batch()
    spent = time.process_time() - started
    await chain.close()
    return spent / batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpc-calls", type=int, default=800)
    args = parser.parse_args()
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    with TemporaryDirectory() as tmp, anvil(Path(tmp)) as deployment, process(
        uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True), ready=f"{upstream}/stats"
    ):
        send = uvloop.run(_sends(upstream + UPSTREAM_PATH, args.calls, args.concurrency))
        rpc = uvloop.run(_batches(deployment.rpc_url, args.rpc_calls))
    print(f"upstream send: {send * 1e6:.1f} us CPU each; JSON-RPC batch of 8 eth_calls: {rpc * 1e6:.1f} us CPU each")


if __name__ == "__main__":
    main()
