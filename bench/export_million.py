"""Benchmark: bulk-insert N payments (default 1,000,000) into a SQLite ledger, then export them in
each format, each export in a fresh process so its peak RSS is its own.

    python bench/export_million.py                       # 1,000,000 rows, csv + jsonl + parquet
    python bench/export_million.py --rows 20000 --json   # what the test suite runs

Prints, per format: seconds, rows/s, output size, RSS after start-up and peak RSS
(``resource.getrusage``; ru_maxrss is KiB on Linux). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STATES = ("settled",) * 8 + ("failed", "voided")
OWNERS = ("acme", "globex", "initech")
TOOLS = ("quote", "report", "weather", "orders")
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(n: int) -> Iterator[tuple[Any, ...]]:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(n):
        when = (start + timedelta(seconds=i * 7)).strftime("%Y-%m-%d %H:%M:%S.%f")
        state = STATES[i % len(STATES)]
        settled = state == "settled"
        yield (
            f"req-{i:012d}", when, when, OWNERS[i % 3], TOOLS[i % 4], "GET", f"/quotes/{i}",
            f"0x{i:040x}", PAY_TO, str(1000 + i % 5000), "eip155:31337", ASSET, f"0x{i:064x}", 1_900_000_000,
            "{}", state, "insufficient_funds" if state == "failed" else None, 200,
            f"0x{i:064x}" if settled else None, 100 + i // 10 if settled else None, "after", 6,
        )


def insert(db: Path, n: int) -> float:
    """Create the schema through the Ledger (migrations), then one bulk transaction in raw SQLite."""
    from settlement.schema import open_ledger

    open_ledger(f"sqlite:///{db}").close()
    began = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    with conn:
        conn.executemany(
            "INSERT INTO payments (request_id, created_at, updated_at, owner, tool, method, path, payer, pay_to,"
            " amount, network, asset, nonce, valid_before, authorization, state, error_reason, upstream_status,"
            " tx_hash, block_number, settle_mode, decimals) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            _rows(n),
        )
    conn.close()
    return time.perf_counter() - began


def export_once(db: Path, fmt: str, output: Path) -> dict[str, Any]:
    """Run in a fresh process: export everything, report time and memory."""
    from settlement.finance.export import Filters, export
    from settlement.schema import open_ledger

    if fmt == "parquet":
        import pyarrow.parquet  # noqa: F401  (the library's own size is not the export's growth)

    ledger = open_ledger(f"sqlite:///{db}")
    baseline = rss_now_mb()
    began = time.perf_counter()
    with open(output, "wb") if fmt == "parquet" else open(output, "w", encoding="utf-8", newline="") as out:
        rows = export(ledger, Filters(), fmt, out)  # type: ignore[arg-type]
    seconds = time.perf_counter() - began
    ledger.close()
    return {
        "format": fmt, "rows": rows, "seconds": round(seconds, 2), "rows_per_second": int(rows / seconds),
        "output_mb": round(output.stat().st_size / 2**20, 1), "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_growth_mb": round(peak_rss_mb() - baseline, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", dest="formats", action="append", choices=["csv", "jsonl", "parquet"])
    parser.add_argument("--dir", type=Path, default=None, help="Work directory (default: a temporary one).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    parser.add_argument("--export-only", type=Path, default=None, help=argparse.SUPPRESS)  # child mode: the db
    args = parser.parse_args()
    formats = args.formats or ["csv", "jsonl", "parquet"]

    if args.export_only is not None:
        [fmt] = formats
        print(json.dumps(export_once(args.export_only, fmt, args.export_only.with_suffix(f".{fmt}"))))
        return 0

    with tempfile.TemporaryDirectory(prefix="x402gw-bench-") as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        db = work / "ledger.sqlite3"
        db.unlink(missing_ok=True)
        insert_seconds = insert(db, args.rows)
        results = []
        for fmt in formats:
            child = subprocess.run(
                [sys.executable, __file__, "--export-only", str(db), "--format", fmt],
                check=True, capture_output=True, text=True,
            )
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        summary = {"rows": args.rows, "insert_seconds": round(insert_seconds, 2),
                   "db_mb": round(db.stat().st_size / 2**20, 1), "exports": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"inserted {args.rows:,} rows in {summary['insert_seconds']} s (SQLite file {summary['db_mb']} MB)")
        for r in results:
            print(f"{r['format']:8} {r['seconds']:8.2f} s  {r['rows_per_second']:>9,} rows/s  {r['output_mb']:7.1f} MB"
                  f"  RSS start {r['baseline_rss_mb']:.1f} MB, peak {r['peak_rss_mb']:.1f} MB"
                  f" (+{r['peak_growth_mb']:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
