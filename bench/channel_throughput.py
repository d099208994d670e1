"""Paid throughput: batch-settlement next to exact (case D's setup), with one load generator.

    python -m bench.channel_throughput [--duration 5] [--concurrencies 1,32]

Each case is a gateway process (the embedded setup of ``bench.run``: in-memory store, SQLite
ledger, one process) on a fresh anvil with the sample upstream, driven by the same aiohttp
generator for ``--duration`` seconds per concurrency, every request a paid GET that must answer 200:

* ``D``: the demo catalog's exact tool, each request with its own pre-signed EIP-3009 payment
  (settled before the answer: one transaction per call);
* ``CH``: the same tool sold in batch-settlement; each of the C workers pays through its own channel
  (opened beforehand by the official SDK client: its deposit and first call), then sends its
  pre-signed vouchers in order; claims every 100 accepted vouchers (the default) inside the request
  that reaches the count.

Prints one line per case and concurrency (req/s, p50, p99) and the ratio CH/D.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bench.cost_per_call import CATALOG, pay_channel
from bench.run import GATEWAY_PATH, PAY_TO, REPO, anvil, fetch_offer, free_port, payment_headers, process

PATH = "/quotes/ACME"


@contextmanager
def serve(workdir: Path, deployment: Any, catalog_text: str, name: str, env: dict[str, str]) -> Iterator[str]:
    catalog = workdir / f"{name}.yaml"
    catalog.write_text(catalog_text)
    deployment_file = workdir / f"{name}-devchain.json"
    deployment.write(deployment_file)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(deployment_file), "X402GW_PORT": str(port),
            "X402GW_DATABASE_URL": f"sqlite:///{workdir / f'{name}.sqlite3'}", "X402GW_LOG_LEVEL": "WARNING", **env}
    with process([sys.executable, "-m", "gateway.cli.main", "serve"], env=full, ready=f"{url}/healthz",
                 log=workdir / f"{name}.log"):
        yield url


async def drive(url: str, path: str, queues: list[list[str]], duration: float) -> dict[str, Any]:
    """One worker per queue, each sending its headers in order until the time or its queue is out."""
    latencies: list[float] = []
    failed = 0
    deadline = time.perf_counter() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(queues) + 4)) as session:

        async def worker(queue: list[str]) -> None:
            nonlocal failed
            for header in queue:
                if time.perf_counter() >= deadline:
                    return
                t0 = time.perf_counter()
                async with session.get(url + path, headers={"PAYMENT-SIGNATURE": header}) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        failed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(q) for q in queues))
        seconds = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return {"ok": len(latencies), "failed": failed, "seconds": seconds, "rps": len(latencies) / seconds,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def exact_case(workdir: Path, upstream: str, concurrency: int, duration: float) -> dict[str, Any]:
    catalog = (REPO / "catalog" / "examples" / "demo.yaml").read_text().replace("http://127.0.0.1:9101", upstream)
    with anvil(workdir) as deployment, serve(workdir, deployment, catalog, f"D-c{concurrency}", {}) as url:
        offer = fetch_offer(url + GATEWAY_PATH)
        headers = payment_headers(offer, int(400 * duration) + 100)
        queues = [headers[i::concurrency] for i in range(concurrency)]
        return asyncio.run(drive(url, GATEWAY_PATH, queues, duration))


def channel_case(workdir: Path, upstream: str, concurrency: int, duration: float, per_worker: int) -> dict[str, Any]:
    from eth_account import Account
    from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
    from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
    from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
    from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
    from x402.mechanisms.evm.signers import EthAccountSigner
    from x402.schemas import PaymentRequirements

    with anvil(workdir) as deployment:
        text = CATALOG.format(token=deployment.token.address, pay_to=PAY_TO, upstream=upstream)
        env = {"X402GW_CHANNEL_DEPOSIT_CALLS": str(per_worker + 10)}
        with serve(workdir, deployment, text, f"CH-c{concurrency}", env) as url:
            required = fetch_offer(url + PATH)
            accepted = required["accepts"][0]
            queues = []
            for w in range(concurrency):
                account = deployment.accounts[w % len(deployment.accounts)]
                salt = f"0x{w + 1:064x}"
                asyncio.run(pay_channel(url, account.private_key, deployment.token.address, 1, salt))  # deposit + call 1
                signer = EthAccountSigner(Account.from_key(account.private_key))
                scheme = BatchSettlementEvmScheme(signer, BatchSettlementEvmSchemeOptions(salt=salt))
                config = scheme.build_channel_config(PaymentRequirements.model_validate(accepted))
                channel_id = compute_channel_id(config, "eip155:31337")
                queue = []
                for k in range(2, per_worker + 2):
                    voucher = sign_voucher(signer, channel_id, k * int(accepted["amount"]), "eip155:31337")
                    payload = {"type": "voucher", "channelConfig": config.to_dict(), "voucher": voucher.to_dict()}
                    wire = {"x402Version": 2, "resource": required["resource"], "accepted": accepted, "payload": payload}
                    queue.append(base64.b64encode(json.dumps(wire).encode()).decode())
                queues.append(queue)
            return asyncio.run(drive(url, PATH, queues, duration))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrencies", default="1,32")
    args = parser.parse_args()
    from gateway.devkit.samples import rest_upstream
    from gateway.ops.serving import ThreadServer

    with tempfile.TemporaryDirectory() as tmp, ThreadServer(rest_upstream.create_app()) as upstream:
        workdir = Path(tmp)
        for concurrency in (int(c) for c in args.concurrencies.split(",")):
            d = exact_case(workdir, upstream.url, concurrency, args.duration)
            per_worker = max(50, int(600 * args.duration / concurrency))
            ch = channel_case(workdir, upstream.url, concurrency, args.duration, per_worker)
            for name, r in (("D  (exact)", d), ("CH (batch-settlement)", ch)):
                print(f"{name:22} c={concurrency:<3} {r['rps']:8.1f} req/s   p50 {r['p50_ms']:7.2f} ms   "
                      f"p99 {r['p99_ms']:7.2f} ms   ({r['ok']} ok, {r['failed']} failed, {r['seconds']:.1f} s)", flush=True)
            print(f"CH/D c={concurrency}: {ch['rps'] / d['rps']:.2f}", flush=True)


if __name__ == "__main__":
    main()
