"""CPU spent per paid call by each process: the gateway, anvil and the upstream.

    python -m bench.cpu_per_call [--batched] [--duration 5] [--concurrency 32] [--config replica] [--workers 2]

Starts the sample upstream, a fresh anvil and one gateway process as ``bench.run`` does, drives paid
calls with wrk (pre-signed authorizations) and reads each process's CPU time from /proc before and
after: what a paid call costs where, which tells whether the gateway or the chain is the limit
(replica: also the local PostgreSQL's and Redis's processes).
With ``--workers 2`` (replica) the gateway's CPU is its supervisor's and workers' together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import (
    BATCH_POLICY,
    GATEWAY_PATH,
    anvil,
    fetch_offer,
    free_port,
    gateway_deployed,
    payment_headers,
    process,
    require_wrk,
    uvicorn_cmd,
    write_lines,
    wrk,
)
from bench.setups import Setup, process_tree
from gateway.devkit.devchain import LOCAL_NETWORK


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = float(__import__("os").sysconf("SC_CLK_TCK"))
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def threads_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds of each thread of ``pids``: ``loop`` (each process's main thread, its event loop)
    and the others by process and thread id (Python's threads all share the process's name)."""
    tick = float(__import__("os").sysconf("SC_CLK_TCK"))
    seconds: dict[str, float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = "loop" if task.name == str(pid) else f"{pid}/{task.name}"
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return seconds


def named(name: str) -> list[int]:
    """Every process whose command is ``name`` (PostgreSQL's backends, Redis)."""
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out]


def servers_cpu() -> float:
    """CPU seconds of the local PostgreSQL's and Redis's processes (shared with anything else using
    them: run nothing else meanwhile). A backend that ends during the run takes its time with it."""
    total = 0.0
    for pid in named("postgres") + named("redis-server"):
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def newest(pattern: str) -> int:
    out = subprocess.run(["pgrep", "-f", "-n", pattern], capture_output=True, text=True).stdout.split()
    if not out:
        raise RuntimeError(f"no process matches {pattern!r}")
    return int(out[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batched", action="store_true", help="batched settlement (case F) instead of D")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--config", choices=("embedded", "replica"), default="embedded")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers (more than 1: replica)")
    args = parser.parse_args(argv)
    require_wrk()
    setup = Setup("replica" if args.workers > 1 else args.config, args.workers)
    with tempfile.TemporaryDirectory(prefix="x402gw-cpu-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        env = {"X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: BATCH_POLICY})} if args.batched else None
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True),
                     ready=f"{upstream}/stats") as upstream_process:
            with anvil(workdir) as deployment, \
                    gateway_deployed(workdir, deployment, upstream, "cpu", env, setup) as (url, where):
                gateway_pids = process_tree(where.pid)
                pids = {
                    "anvil": newest(f"anvil --host 127.0.0.1 --port {deployment.rpc_url.rsplit(':', 1)[1]}"),
                    "upstream": upstream_process.pid,
                }
                offer = fetch_offer(url + GATEWAY_PATH)
                headers = write_lines(workdir / "h.txt", payment_headers(offer, int(800 * args.duration) + 200))
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                before["gateway"] = sum(cpu_seconds(pid) for pid in gateway_pids)
                before["postgres+redis"] = servers_cpu()
                sys_before = sum(cpu_split(pid)[1] for pid in gateway_pids)
                threads_before = threads_cpu(gateway_pids)
                result = wrk(url, GATEWAY_PATH, 200, args.concurrency, args.duration, headers)
                after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                after["gateway"] = sum(cpu_seconds(pid) for pid in gateway_pids)
                after["postgres+redis"] = servers_cpu()
                system = sum(cpu_split(pid)[1] for pid in gateway_pids) - sys_before
                threads_after = threads_cpu(gateway_pids)
    calls = result["ok"]
    if not calls:
        print("no paid call succeeded", file=sys.stderr)
        return 1
    rate = calls / (result["duration_us"] / 1e6)
    names = ["gateway", *pids] + (["postgres+redis"] if setup.config == "replica" else [])
    parts = ", ".join(f"{name} {1000 * (after[name] - before[name]) / calls:.2f} ms" for name in names)
    print(f"{'F (batched)' if args.batched else 'D'}{setup.label} c={args.concurrency}: {rate:.0f} paid calls/s; "
          f"CPU per call: {parts} (gateway in the kernel: {1000 * system / calls:.2f} ms)")
    by_thread = {name: after_s - threads_before.get(name, 0.0) for name, after_s in threads_after.items()}
    print("gateway threads: " + ", ".join(
        f"{name} {1000 * spent / calls:.2f} ms" for name, spent in sorted(by_thread.items(), key=lambda kv: -kv[1])
        if spent > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
