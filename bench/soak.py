"""Soak: a bounded run at a steady paid rate, to show nothing grows that should not (issue 20 item 4).

    python -m bench.soak [--minutes 10] [--rate 20] [--config embedded|replica] [--output bench/soak_results.txt]

Starts the sample upstream, a fresh anvil (automine) and one gateway process as ``bench.run``
does, then sends paid calls (case D: one settlement transaction each) at ``--rate`` per second for
``--minutes``, each with an authorization signed shortly before it is sent (they expire after the
catalog's 120 s). At the end of every minute it records the gateway's RSS and open file
descriptors, the ledger's rows and the payee's token balance on chain. It checks, and exits 1 if
any fails:

* memory flat: every RSS sample after the first minute (the warm-up) within 10% of the RSS at
  the end of that first minute;
* ledger == chain at the end: the settled rows' amounts add up to what the payee gained, and each
  200 answer is one settled row;
* zero 5xx answers.

The table and the verdicts are printed and written to ``--output``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import sqlalchemy

from bench.run import (
    GATEWAY_PATH,
    PAY_TO,
    anvil,
    fetch_offer,
    free_port,
    gateway_deployed,
    payment_headers,
    process,
    rpc,
    uvicorn_cmd,
)
from bench.setups import Setup

REPO = Path(__file__).resolve().parent.parent
SIGN_AHEAD_SECONDS = 20  # authorizations are signed for the next 20 s of calls (valid 120 s)
BALANCE_OF = "0x70a08231"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_status: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # no HTTP answer at all (connection refused, timeout)

    def count(self, status: int | None) -> None:
        with self.lock:
            if status is None:
                self.errors += 1
            else:
                self.by_status[status] = self.by_status.get(status, 0) + 1

    @property
    def ok(self) -> int:
        return self.by_status.get(200, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.by_status.items() if status >= 500)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def balance(rpc_url: str, token: str, holder: str) -> int:
    data = BALANCE_OF + holder[2:].lower().rjust(64, "0")
    return int(rpc(rpc_url, "eth_call", [{"to": token, "data": data}, "latest"]), 16)


def ledger_counts(engine: sqlalchemy.Engine) -> tuple[int, int, int]:
    """(rows, settled rows, settled amount)."""
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT count(*) FROM payments")).scalar_one()
        settled, amount = conn.execute(sqlalchemy.text(
            "SELECT count(*), coalesce(sum(CAST(amount AS BIGINT)), 0) FROM payments WHERE state = 'settled'"
        )).one()
    return int(rows), int(settled), int(amount)


def drive(url: str, offer: dict[str, object], rate: float, seconds: float, tally: Tally, minute_mark: threading.Event,
          ) -> None:
    """Paid calls at ``rate`` per second for ``seconds``, signed in chunks shortly before use;
    ``minute_mark`` is set at the end of each minute (the sampler waits on it)."""
    client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=16))

    def call(header: str) -> None:
        try:
            tally.count(client.get(GATEWAY_PATH, headers={"PAYMENT-SIGNATURE": header}).status_code)
        except httpx.HTTPError:
            tally.count(None)

    pending: list[str] = []
    start = time.monotonic()
    total = int(rate * seconds)
    next_minute = 60.0
    pause = threading.Event()
    with ThreadPoolExecutor(16) as pool:
        for i in range(total):
            if not pending:
                pending = payment_headers(offer, int(rate * SIGN_AHEAD_SECONDS) + 1)[::-1]
            due = start + i / rate
            while (now := time.monotonic()) < due:
                pause.wait(due - now)
            if now - start >= next_minute:
                next_minute += 60.0
                minute_mark.set()
            pool.submit(call, pending.pop())
    client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="paid calls per second")
    parser.add_argument("--config", choices=("embedded", "replica"), default="embedded")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "soak_results.txt")
    args = parser.parse_args(argv)
    lines = [f"$ python -m bench.soak --minutes {args.minutes:g} --rate {args.rate:g} --config {args.config}",
             f"started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs (shared with anvil, the "
             "upstream, this load and other work)", ""]
    with tempfile.TemporaryDirectory(prefix="x402gw-soak-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        with process(uvicorn_cmd("gateway.devkit.samples.rest_upstream:create_app", port, factory=True),
                     ready=f"{upstream}/stats"), anvil(workdir) as deployment, \
                gateway_deployed(workdir, deployment, upstream, "soak", setup=Setup(args.config)) as (url, where):
            results = soak(args, url, where.pid, deployment.rpc_url, deployment.token.address, where.database_url, lines)
    lines += results
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.write_text(text)
    return 1 if any(line.startswith("FAILED") for line in results) else 0


def soak(args: argparse.Namespace, url: str, pid: int, rpc_url: str, token: str, database: str, lines: list[str],
         ) -> list[str]:
    """Runs the load, samples each minute into ``lines``; the verdicts."""
    engine = sqlalchemy.create_engine(database)
    payee_before = balance(rpc_url, token, PAY_TO)
    tally = Tally()
    mark = threading.Event()
    load = threading.Thread(target=drive, args=(url, fetch_offer(url + GATEWAY_PATH), args.rate, args.minutes * 60,
                                                tally, mark), daemon=True)
    lines.append(f"{'minute':>6} {'RSS MiB':>8} {'open fds':>8} {'ledger rows':>11} {'payee gained':>13} "
                 f"{'200s':>6} {'5xx':>4} {'other':>5}")
    samples: list[int] = []
    load.start()
    minute = 0
    while load.is_alive() or mark.is_set():
        if not mark.wait(1.0):
            continue
        mark.clear()
        minute += 1
        samples.append(_sample(minute, pid, engine, rpc_url, token, payee_before, tally, lines))
    load.join()
    with httpx.Client(timeout=10) as client:  # the last calls have answered once the pool has drained
        client.get(url + "/healthz")
    minute += 1
    samples.append(_sample(minute, pid, engine, rpc_url, token, payee_before, tally, lines))
    rows, settled, amount = ledger_counts(engine)
    gained = balance(rpc_url, token, PAY_TO) - payee_before
    engine.dispose()
    return verdicts(samples, rows, settled, amount, gained, tally)


def _sample(minute: int, pid: int, engine: sqlalchemy.Engine, rpc_url: str, token: str, payee_before: int,
            tally: Tally, lines: list[str]) -> int:
    rss = rss_kib(pid)
    rows, _, _ = ledger_counts(engine)
    gained = balance(rpc_url, token, PAY_TO) - payee_before
    other = sum(n for s, n in tally.by_status.items() if s != 200 and s < 500) + tally.errors
    line = (f"{minute:>6} {rss / 1024:8.1f} {open_fds(pid):>8} {rows:>11} {gained / 1e6:>11.3f} $ "
            f"{tally.ok:>6} {tally.server_errors:>4} {other:>5}")
    lines.append(line)
    print(line, flush=True)
    return rss


def verdicts(samples: list[int], rows: int, settled: int, amount: int, gained: int, tally: Tally) -> list[str]:
    out = [""]
    if len(samples) >= 3:
        base, top = samples[0], max(samples[1:])
        growth = (top - base) / base
        word = "ok" if growth <= 0.10 else "FAILED"
        out.append(f"{word}: memory flat: RSS after the warm-up minute {base / 1024:.1f} MiB, highest later "
                   f"{top / 1024:.1f} MiB ({100 * growth:+.1f}%, limit +10%)")
    else:
        out.append("not judged: memory flat needs at least 3 minutes of samples (run with --minutes 3 or more)")
    same = amount == gained and settled == tally.ok
    out.append(f"{'ok' if same else 'FAILED'}: ledger == chain: {settled} settled rows of {rows}, "
               f"{amount} atomic units settled, payee gained {gained}; {tally.ok} answers 200")
    out.append(f"{'ok' if tally.server_errors == 0 else 'FAILED'}: 5xx answers: {tally.server_errors} "
               f"(other answers: {dict(sorted((s, n) for s, n in tally.by_status.items() if s != 200))}, "
               f"no answer: {tally.errors})")
    return out


if __name__ == "__main__":
    sys.exit(main())
