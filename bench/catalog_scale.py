"""Item 4: a 10,000-endpoint catalog loads in under 2 s and does not change per-request latency.

    python -m bench.catalog_scale [--endpoints 10000] [--requests 2000]

Generates a catalog of N tools (distinct path templates, each with a path parameter and an input
schema), times ``load_catalogs`` and ``create_app`` (router, limits and upstream calls of every tool;
a tool's offer and argument validator are built on its first request, which the warm-up makes),
then times the unpaid 402 path in-process (httpx over ASGI, no sockets) on the demo catalog and on
the large one, hitting the first, middle and last tool. Prints both; exits 1 when load and
create_app together take 2 s or more.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from catalog import load_catalogs
from gateway.app import create_app
from gateway.settings import DEFAULT_CATALOG, Settings
from settlement.schema import open_ledger

HEADER = """catalog: 1
owner: scale-test
description: "generated catalog for bench/catalog_scale.py"
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
  max_timeout_seconds: 120
upstreams:
  legacy:
    base_url: "http://127.0.0.1:9101"
    timeout_seconds: 10
tools:
"""

TOOL = """  - name: tool_{i}
    description: "Generated endpoint number {i}: returns a quote for a symbol."
    method: GET
    path: /svc{i}/quotes/{{symbol}}
    upstream: legacy
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.002
    input_schema:
      type: object
      properties:
        symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}
      required: [symbol]
      additionalProperties: false
"""


class NoFacilitator:
    """The 402 path never reaches a facilitator; this stands in so no chain is needed."""

    def supported(self) -> dict[str, Any]:
        return {"kinds": [], "extensions": [], "signers": {}}


def write_catalog(path: Path, endpoints: int) -> Path:
    path.write_text(HEADER + "".join(TOOL.format(i=i) for i in range(endpoints)))
    return path


async def latency(app: Any, paths: list[str], requests: int) -> tuple[float, float]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        for path in paths:  # warm-up
            assert (await client.get(path)).status_code == 402
        samples = []
        for i in range(requests):
            t0 = time.perf_counter()
            response = await client.get(paths[i % len(paths)])
            samples.append(time.perf_counter() - t0)
            assert response.status_code == 402, response.text
    samples.sort()
    return statistics.median(samples) * 1000, samples[int(0.99 * len(samples))] * 1000


def measure(catalog: Path, paths: list[str], requests: int, workdir: Path, name: str) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    catalogs = load_catalogs([catalog])
    loaded = time.perf_counter() - t0
    settings = Settings(catalog=[catalog], database_url=f"sqlite:///{workdir / f'{name}.sqlite3'}")
    ledger = open_ledger(settings.database_url)
    t1 = time.perf_counter()
    app = create_app(settings, catalogs=catalogs, facilitator=NoFacilitator(), ledger=ledger)  # type: ignore[arg-type]
    built = time.perf_counter() - t1
    p50, p99 = asyncio.run(latency(app, paths, requests))
    ledger.close()
    return loaded, built, p50, p99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        small = measure(DEFAULT_CATALOG, ["/quotes/AAPL"], args.requests, workdir, "small")
        big_catalog = write_catalog(workdir / "big.yaml", args.endpoints)
        n = args.endpoints
        big_paths = ["/svc0/quotes/AAPL", f"/svc{n // 2}/quotes/AAPL", f"/svc{n - 1}/quotes/AAPL"]
        big = measure(big_catalog, big_paths, args.requests, workdir, "big")
    print(f"catalog scale ({args.requests} unpaid requests in-process, httpx over ASGI, 402 each)")
    print(f"  demo catalog (5 tools):       load {small[0]*1000:8.1f} ms   create_app {small[1]*1000:8.1f} ms   "
          f"402 p50 {small[2]:.3f} ms   p99 {small[3]:.3f} ms")
    print(f"  {n} tools:                 load {big[0]*1000:8.1f} ms   create_app {big[1]*1000:8.1f} ms   "
          f"402 p50 {big[2]:.3f} ms   p99 {big[3]:.3f} ms")
    total = big[0] + big[1]
    print(f"  {n}-endpoint catalog ready in {total:.2f} s (load + compile); target < 2 s: "
          f"{'met' if total < 2 else 'MISSED'}; p50 ratio big/small {big[2] / small[2]:.2f}")
    return 0 if total < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
