"""Issue 17 item 2: tool search on a 10,000-tool catalog: index build time and query latency.

    python -m bench.tool_search [--tools 10000] [--rounds 20]

Writes the generated catalog of tests/support/tool_catalog.py (hand-written tools among generated
ones sharing their words), loads it, then times:

* the FTS5 index build (``ToolSearch.build``: every tool's name, description and parameters);
* a query on the index alone (the 26 natural-language queries, ``rounds`` times each, top 10);
* ``GET /tools?q=...&limit=10`` and ``...&budget=2000`` in-process (httpx over ASGI, no sockets):
  parsing, ranking, fitting and the JSON answer.

Prints p50 and p99 of each and how many queries found their tool first.
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
from gateway.settings import Settings
from gateway.surfaces.search import ToolSearch
from settlement.schema import open_ledger
from tests.support.tool_catalog import QUERIES, write_catalog


class NoFacilitator:
    """Search never reaches a facilitator; this stands in so no chain is needed."""

    def supported(self) -> dict[str, Any]:
        return {"kinds": [], "extensions": [], "signers": {}}


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


async def http_latency(app: Any, rounds: int, extra: dict[str, str]) -> list[float]:
    transport = httpx.ASGITransport(app=app)
    samples: list[float] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.get("/tools", params={"q": "warm up", **extra})).status_code == 200
        for _ in range(rounds):
            for query, _answer in QUERIES:
                t0 = time.perf_counter()
                response = await client.get("/tools", params={"q": query, **extra})
                samples.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tools", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        catalog = write_catalog(workdir / "big.yaml", args.tools)
        catalogs = load_catalogs([catalog])
        tools = list(catalogs.tools)

        search = ToolSearch(lambda: tools)
        t0 = time.perf_counter()
        search.build()
        build = time.perf_counter() - t0

        index_samples: list[float] = []
        first = 0
        for round_ in range(args.rounds):
            for query, answer in QUERIES:
                t0 = time.perf_counter()
                hits = search.search(query, 10)
                index_samples.append(time.perf_counter() - t0)
                if round_ == 0:
                    first += bool(hits) and hits[0].tool.name == answer

        settings = Settings(catalog=[catalog], database_url=f"sqlite:///{workdir / 'ledger.sqlite3'}")
        ledger = open_ledger(settings.database_url)
        app = create_app(settings, catalogs=catalogs, facilitator=NoFacilitator(), ledger=ledger)  # type: ignore[arg-type]
        limited = asyncio.run(http_latency(app, args.rounds, {"limit": "10"}))
        budgeted = asyncio.run(http_latency(app, args.rounds, {"limit": "100", "budget": "2000"}))
        ledger.close()

    n = len(QUERIES) * args.rounds
    print(f"tool search on {len(tools)} tools ({len(QUERIES)} queries x {args.rounds} rounds = {n} each)")
    print(f"  index build (FTS5, in memory):        {build * 1000:8.1f} ms")
    print("  query, index only (top 10):           p50 {:.3f} ms   p99 {:.3f} ms".format(*percentiles(index_samples)))
    print("  GET /tools?q=&limit=10 (in-process):  p50 {:.3f} ms   p99 {:.3f} ms".format(*percentiles(limited)))
    print("  GET /tools?q=&budget=2000:            p50 {:.3f} ms   p99 {:.3f} ms".format(*percentiles(budgeted)))
    print(f"  expected tool first: {first} of {len(QUERIES)} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
