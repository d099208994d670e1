"""Profile x402gw's unpaid (402) and paid paths under wrk load with py-spy (pip install py-spy).

    python -m bench.profile_gateway [--duration 8] [--out /tmp] [--batched] [--config replica]

Starts a fresh anvil, the sample upstream and one gateway process (as ``bench.run`` does), drives
it with wrk at concurrency 32 (py-spy starts each gateway as its child) and writes py-spy's aggregated profiles (``--format raw``, collapsed
stacks) plus a top-functions summary for each path.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sys
import tempfile
import time
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
from bench.setups import Setup
from gateway.devkit.devchain import LOCAL_NETWORK


def top(collapsed: Path, n: int = 25) -> list[str]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if any(frame in stack for frame in STARTUP_FRAMES):
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            incl[frame] += samples
    out = [f"  {total} samples; top self time:"]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    out += ["  top inclusive time (x402gw code):"]
    ours = [(f, c) for f, c in incl.most_common() if any(p in f for p in ("gateway/", "settlement/", "catalog/"))]
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in ours[:n]]
    return out


# Samples taken while the gateway started (imports, migrations, the catalog's compilation) are not
# the paths under load: stacks through any of these frames are left out of the summary.
STARTUP_FRAMES = ("_call_with_frames_removed", "_find_and_load", "startup (", "_lifespan (", "build_app (")


def profiled(target: Path, duration: int) -> list[str]:
    """py-spy as the gateway's launcher (py-spy cannot attach to a running process on every
    machine: ptrace may be refused; its own child it can always read)."""
    return ["py-spy", "record", "--gil", "--rate", "200", "--format", "raw", "--output", str(target), "--nonblocking",
            "--duration", str(duration + 120), "--"]


def stop_profiler(pid: int, target: Path) -> None:
    """Interrupt py-spy (it writes its profile and stops the gateway) and wait for the file."""
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not target.exists():
        raise RuntimeError(f"py-spy wrote no profile to {target}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--out", default=tempfile.gettempdir())
    parser.add_argument("--batched", action="store_true", help="settle in batches (as case F of bench.run)")
    parser.add_argument("--config", choices=("embedded", "replica"), default="embedded",
                        help="replica: Redis store + PostgreSQL ledger (bench.setups)")
    args = parser.parse_args()
    require_wrk()
    setup = Setup(args.config)
    if not shutil.which("py-spy"):
        sys.exit("py-spy is not on PATH: pip install py-spy (or run from an activated venv that has it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True), ready=f"{upstream}/stats"):
            env = {"X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: BATCH_POLICY})} if args.batched else None
            for name, paid in (("unpaid", False), ("paid", True)):
                target = out / f"x402gw-{name}.collapsed"
                target.unlink(missing_ok=True)
                launcher = profiled(target, args.duration)
                with anvil(workdir) as deployment, \
                        gateway_deployed(workdir, deployment, upstream, name, env, setup, launcher) as (url, where):
                    headers_file = None
                    if paid:
                        offer = fetch_offer(url + GATEWAY_PATH)
                        headers_file = write_lines(workdir / "h.txt", payment_headers(offer, 1000 * args.duration))
                    result = wrk(url, GATEWAY_PATH, 200 if paid else 402, 32, args.duration, headers_file)
                    stop_profiler(where.pid, target)
                print(f"== {name}: {result}")
                print("\n".join(top(target)))


if __name__ == "__main__":
    sys.exit(main())
