"""Case G's load generator: pre-signed settlement transactions straight to anvil, no HTTP in front.

Each of ``--concurrency`` workers takes the next raw ``transferWithAuthorization`` transaction from
the file, sends it with ``eth_sendRawTransaction`` and polls ``eth_getTransactionReceipt`` until it
is mined, for ``--duration`` seconds: 32 independent senders, each waiting for its own transaction.
Prints one JSON line. Run by ``bench.run`` in its own process (pinned with taskset), so it does not
share the harness's GIL.

With automine, anvil mines a block as each of these requests arrives: about one transaction per
block. x402gw's chain client coalesces concurrent settlements' broadcasts into JSON-RPC batches,
which anvil pools before it mines, so several settlement transactions share a block (each payment
still has its own transaction): this is how case D can pass G.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

try:
    import uvloop
except ImportError:  # pragma: no cover - the venv has it
    uvloop = None


async def run(rpc_url: str, txs: list[str], concurrency: int, duration: float) -> dict[str, object]:
    latencies: list[float] = []
    failed = 0
    source = iter(txs)
    exhausted = False
    ids = iter(range(1, 10**9))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:

        async def rpc(method: str, params: list[object]) -> object:
            body = {"jsonrpc": "2.0", "id": next(ids), "method": method, "params": params}
            async with session.post(rpc_url, json=body) as response:
                answer = await response.json(content_type=None)
            if "error" in answer:
                raise RuntimeError(answer["error"])
            return answer.get("result")

        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal failed, exhausted
            while time.perf_counter() < deadline:
                raw = next(source, None)
                if raw is None:
                    exhausted = True
                    return
                t0 = time.perf_counter()
                try:
                    tx_hash = await rpc("eth_sendRawTransaction", [raw])
                    delay = 0.001
                    while (receipt := await rpc("eth_getTransactionReceipt", [tx_hash])) is None:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 0.05)
                    if int(receipt["status"], 16) != 1:  # type: ignore[index]
                        failed += 1
                except Exception:
                    failed += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(latencies), "duration_us": int(elapsed * 1e6), "p50_us": int(pct(0.50) * 1e6),
        "p99_us": int(pct(0.99) * 1e6), "ok": len(latencies) - failed, "bad": failed, "exhausted": int(exhausted),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpc", required=True)
    parser.add_argument("--txs", required=True, help="file of 0x raw transactions, one per line")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    with open(args.txs) as handle:
        txs = [line.strip() for line in handle if line.strip()]
    if uvloop is not None:
        uvloop.install()
    print("RESULTJSON " + json.dumps(asyncio.run(run(args.rpc, txs, args.concurrency, args.duration))))


if __name__ == "__main__":
    main()
