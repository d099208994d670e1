"""Profile x402gw's unpaid (402) and paid paths under wrk load with py-spy (pip install py-spy).

    python -m bench.profile_gateway [--duration 8] [--out /tmp]

Starts a fresh anvil, the sample upstream and one gateway process (as ``bench.run`` does), drives
it with wrk at concurrency 32 and writes py-spy's aggregated profiles (``--format raw``, collapsed
stacks) plus a top-functions summary for each path.
"""

from __future__ import annotations

import argparse
import collections
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
    gateway,
    payment_headers,
    process,
    uvicorn_cmd,
    write_lines,
    wrk,
)
from gateway.devkit.devchain import LOCAL_NETWORK


def top(collapsed: Path, n: int = 25) -> list[str]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--out", default=tempfile.gettempdir())
    parser.add_argument("--batched", action="store_true", help="settle in batches (as case F of bench.run)")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True), ready=f"{upstream}/stats"):
            env = {"X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: BATCH_POLICY})} if args.batched else None
            with anvil(workdir) as deployment, gateway(workdir, deployment, upstream, "P", env) as url:
                pid = subprocess.run(["pgrep", "-f", "-n", "gateway.cli.main serve"], capture_output=True, text=True).stdout.split()[0]
                for name, headers in (("unpaid", None), ("paid", True)):
                    headers_file = None
                    if headers:
                        offer = fetch_offer(url + GATEWAY_PATH)
                        headers_file = write_lines(workdir / "h.txt", payment_headers(offer, 400 * args.duration))
                    target = out / f"x402gw-{name}.collapsed"
                    spy = subprocess.Popen(["py-spy", "record", "--pid", pid, "--duration", str(args.duration),
                                            "--rate", "200", "--format", "raw", "--output", str(target), "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    result = wrk(url, GATEWAY_PATH, 200 if headers else 402, 32, args.duration, headers_file)
                    spy.wait()
                    print(f"== {name}: {result}")
                    print("\n".join(top(target)))


if __name__ == "__main__":
    sys.exit(main())
