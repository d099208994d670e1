"""Case G's load generator: pre-signed settlement transactions straight to anvil, no HTTP in front.

Each of ``--concurrency`` workers takes the next raw ``transferWithAuthorization`` transaction from
the file, sends it with ``eth_sendRawTransaction`` and polls ``eth_getTransactionReceipt`` until it
is mined, for ``--duration`` seconds: 32 independent senders, each waiting for its own transaction.
Prints one JSON line. Run by ``bench.run`` in its own process (pinned with taskset), so it does not
share the harness's GIL.

``--batch N`` (informational, not a ratio of the harness): the same transactions in JSON-RPC batches
of N, one batch at a time, as the gateway's chain client coalesces concurrent settlements. A node
spends much less per transaction this way, which is how per-call settlement (D) can come close to,
or pass, G.
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


async def run_batched(rpc_url: str, txs: list[str], batch: int, duration: float) -> dict[str, object]:
    """Informational: the same transactions in JSON-RPC batches of ``batch`` (sends, then one batch
    of receipt polls), one batch at a time: what anvil takes when calls arrive coalesced, as the
    gateway's chain client sends them. Latency is per batch."""
    latencies: list[float] = []
    failed = done = 0
    source = iter(txs)
    exhausted = False
    async with aiohttp.ClientSession() as session:

        async def rpc(calls: list[dict[str, object]]) -> list[dict[str, object]]:
            async with session.post(rpc_url, json=calls) as response:
                return list(await response.json(content_type=None))

        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            raws = [raw for _, raw in zip(range(batch), source)]
            if len(raws) < batch:
                exhausted = True
                break
            t0 = time.perf_counter()
            sent = await rpc([{"jsonrpc": "2.0", "id": i, "method": "eth_sendRawTransaction", "params": [raw]}
                              for i, raw in enumerate(raws)])
            hashes = [answer.get("result") for answer in sorted(sent, key=lambda a: a["id"])]  # type: ignore[arg-type,return-value]
            waiting = [h for h in hashes if h]
            failed += len(hashes) - len(waiting)
            delay = 0.001
            while waiting:
                answers = await rpc([{"jsonrpc": "2.0", "id": i, "method": "eth_getTransactionReceipt", "params": [h]}
                                     for i, h in enumerate(waiting)])
                by_id = {a["id"]: a.get("result") for a in answers}
                still = []
                for i, h in enumerate(waiting):
                    receipt = by_id.get(i)
                    if receipt is None:
                        still.append(h)
                    elif int(receipt["status"], 16) != 1:  # type: ignore[index]
                        failed += 1
                waiting = still
                if waiting:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
            done += len(hashes)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {
        "requests": done, "duration_us": int(elapsed * 1e6), "p50_us": int(pct(0.50) * 1e6),
        "p99_us": int(pct(0.99) * 1e6), "ok": done - failed, "bad": failed, "exhausted": int(exhausted),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpc", required=True)
    parser.add_argument("--txs", required=True, help="file of 0x raw transactions, one per line")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=0, help="send in JSON-RPC batches of this size instead")
    args = parser.parse_args()
    with open(args.txs) as handle:
        txs = [line.strip() for line in handle if line.strip()]
    if uvloop is not None:
        uvloop.install()
    if args.batch:
        result = asyncio.run(run_batched(args.rpc, txs, args.batch, args.duration))
    else:
        result = asyncio.run(run(args.rpc, txs, args.concurrency, args.duration))
    print("RESULTJSON " + json.dumps(result))


if __name__ == "__main__":
    main()
