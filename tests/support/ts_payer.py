"""The official TypeScript x402 client (``@x402/fetch`` + ``@x402/evm``, installed by ``npm ci``) as
a payer in tests: runs ``ts_client/pay.mjs`` with node and returns its JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("ts_client") / "pay.mjs"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("@x402/fetch", "@x402/evm", "viem")


def node() -> str:
    """The node binary; a missing node or missing packages fail the test, with the fix."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not on PATH: the TypeScript x402 client needs Node 20+ (and `npm ci` in the repository)")
    missing = [name for name in PACKAGES if not (ROOT / "node_modules" / name / "package.json").is_file()]
    if missing:
        pytest.fail(f"node_modules lacks {', '.join(missing)}: run `npm ci` in {ROOT} (package.json pins them)")
    return found


def ts_pay(
    url: str,
    key: str,
    *,
    network: str | None = None,
    asset: str | None = None,
    allow: list[tuple[str, str]] | None = None,
    spend_controls: bool = True,
    networks: list[str] | None = None,
) -> dict[str, Any]:
    """One call of ``url`` paid by the TypeScript client with ``key``: the offer on ``network`` in
    ``asset`` when given (the library's policy hook), else the library's own choice. ``allow`` lists
    the (network, asset) its spend controls admit; ``spend_controls=False`` turns them off."""
    args = [node(), str(SCRIPT), url]
    if network:
        args += ["--network", network]
    if asset:
        args += ["--asset", asset]
    for allowed_network, allowed_asset in allow or []:
        args += ["--allow", f"{allowed_network}/{allowed_asset}"]
    if not spend_controls:
        args.append("--no-spend-controls")
    if networks:
        args += ["--networks", ",".join(networks)]
    done = subprocess.run(
        args, cwd=ROOT, env={**os.environ, "X402_PAYER_KEY": key}, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip(), f"pay.mjs exited {done.returncode} with no summary; stderr:\n{done.stderr}"
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    summary["exit"] = done.returncode
    return summary
