"""Where a paid call's latency goes at concurrency 1: the gateway's own share next to the chain's
(verify, settle) and the upstream's (issue 20 item 3).

    python -m bench.latency_breakdown [--calls 300] [--config embedded|replica] [--batched]

Starts the sample upstream, a fresh anvil (automine) and one gateway process as ``bench.run`` does,
then makes ``--calls`` paid calls one after another (pre-signed authorizations, one keep-alive
connection) after a warm-up. The gateway's own timings of each request (``ctx.timings``: verify,
upstream, settle) are read from its ``/metrics`` (``x402gw_stage_seconds`` sums) before and after;
the total is what the client waited. CPU per call of each process (gateway, anvil, upstream) is read
from /proc over the same calls. Prints a table.

What each line holds: *verify* is the scheme's verify (for the local facilitator: the chain reads,
balance and authorization state); it starts early, beside the in-flight lock and the ledger lookup,
so part of it overlaps the gateway's own work. *settle* is the write-ahead ledger row, the broadcast,
the wait for the receipt (one block on anvil's automine) and the settled row. *upstream* is the
call to the sample upstream. *gateway's own* is the rest of the client's wait: HTTP on both sides,
the pipeline's stages, the ledger rows before settlement, the audit trail, the answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.cpu_per_call import cpu_seconds, newest
from bench.run import (
    BATCH_POLICY,
    GATEWAY_PATH,
    anvil,
    fetch_offer,
    free_port,
    gateway_deployed,
    payment_headers,
    process,
    uvicorn_cmd,
)
from bench.setups import Setup
from gateway.devkit.devchain import LOCAL_NETWORK

STAGES = ("verify", "upstream", "settle")
WARM_UP = 20


def stage_sums(client: httpx.Client) -> dict[str, float]:
    """Seconds spent so far per stage, from the gateway's Prometheus text."""
    sums = dict.fromkeys(STAGES, 0.0)
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("x402gw_stage_seconds_sum{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            if stage in sums:
                sums[stage] = float(line.rsplit(" ", 1)[1])
    return sums


def measure(url: str, headers: list[str], pids: dict[str, int]) -> tuple[list[float], dict[str, float], dict[str, float]]:
    """(client waits in s, stage seconds per call, CPU seconds per call by process)."""
    waits: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for header in headers[:WARM_UP]:
            client.get(GATEWAY_PATH, headers={"PAYMENT-SIGNATURE": header}).raise_for_status()
        calls = headers[WARM_UP:]
        before = stage_sums(client)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for header in calls:
            started = time.perf_counter()
            answer = client.get(GATEWAY_PATH, headers={"PAYMENT-SIGNATURE": header})
            waits.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise RuntimeError(f"a paid call answered {answer.status_code}: {answer.text[:200]}")
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        after = stage_sums(client)
    n = len(calls)
    stages = {stage: (after[stage] - before[stage]) / n for stage in STAGES}
    cpu = {name: (cpu_after[name] - cpu_before[name]) / n for name in pids}
    return waits, stages, cpu


def table(waits: list[float], stages: dict[str, float], cpu: dict[str, float], title: str) -> list[str]:
    total = statistics.fmean(waits)
    own = total - sum(stages.values())
    rows = [
        ("verify (chain reads)", stages["verify"]),
        ("settle (ledger + broadcast + receipt)", stages["settle"]),
        ("upstream (sample REST upstream)", stages["upstream"]),
        ("gateway's own (HTTP, pipeline, ledger, audit)", own),
    ]
    lines = [title, f"  {'part of a paid call (mean)':<48} {'ms':>8} {'share':>7}"]
    for name, seconds in rows:
        lines.append(f"  {name:<48} {1000 * seconds:8.2f} {100 * seconds / total:6.1f}%")
    lines.append(f"  {'total (the client waited)':<48} {1000 * total:8.2f} {100.0:6.1f}%")
    ordered = sorted(waits)
    lines.append(f"  client wait p50 {1000 * statistics.median(waits):.2f} ms, p90 "
                 f"{1000 * ordered[int(0.9 * (len(ordered) - 1))]:.2f} ms over {len(waits)} calls")
    lines.append("  CPU per call: " + ", ".join(f"{name} {1000 * seconds:.2f} ms" for name, seconds in cpu.items()))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="paid calls measured (after 20 of warm-up)")
    parser.add_argument("--config", choices=("embedded", "replica"), default="embedded")
    parser.add_argument("--batched", action="store_true", help="batched settlement (case F) instead of D")
    args = parser.parse_args(argv)
    env = {"X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: BATCH_POLICY})} if args.batched else None
    with tempfile.TemporaryDirectory(prefix="x402gw-latency-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True),
                     ready=f"{upstream}/stats") as upstream_process:
            with anvil(workdir) as deployment, \
                    gateway_deployed(workdir, deployment, upstream, "lat", env, Setup(args.config)) as (url, where):
                pids = {
                    "gateway": where.pid,
                    "anvil": newest(f"anvil --host 127.0.0.1 --port {deployment.rpc_url.rsplit(':', 1)[1]}"),
                    "upstream": upstream_process.pid,
                }
                headers = payment_headers(fetch_offer(url + GATEWAY_PATH), args.calls + WARM_UP)
                waits, stages, cpu = measure(url, headers, pids)
    kind = "F (batched settlement)" if args.batched else "D (one settlement transaction per call)"
    store = "memory + SQLite" if args.config == "embedded" else "Redis + PostgreSQL"
    for line in table(waits, stages, cpu, f"paid call at c=1, {kind}, {store}:"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
