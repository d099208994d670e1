"""The export streams: peak memory does not grow with the number of rows. Runs the benchmark
script (bench/export_million.py) at two small sizes, each export in a fresh process, and compares
peak RSS growth; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "export_million.py"


def bench(rows: int, tmp_path: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", str(rows), "--format", "csv", "--format", "parquet", "--json",
         "--dir", str(tmp_path / str(rows))],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {e["format"]: e for e in report["exports"]}


def test_export_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    # The small run already fills one Parquet batch (10,000 rows): both hold the same buffers.
    small, large = bench(12_000, tmp_path), bench(40_000, tmp_path)

    for fmt in ("csv", "parquet"):
        assert (small[fmt]["rows"], large[fmt]["rows"]) == (12_000, 40_000)
        # 28,000 more rows held in a list would be well over 50 MB more.
        assert large[fmt]["peak_growth_mb"] - small[fmt]["peak_growth_mb"] < 15, (small[fmt], large[fmt])
        assert large[fmt]["peak_rss_mb"] < 200, large[fmt]
