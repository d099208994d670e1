"""``x402gw doctor``: checks this configuration (the same X402GW_* environment ``serve`` reads)
against the world before it takes payments, and names each failure with its fix.

Exit status: 0 every check passed, 1 at least one failure, 2 warnings only. ``--format json``
prints the report as one JSON document (``status``, ``exitStatus``, ``counts``, ``findings``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from catalog import CatalogError, load_catalogs

__all__ = ["doctor"]


@click.command()
@click.option("--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path), help="Catalog file (repeatable; default X402GW_CATALOG).")
@click.option("--format", "output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--gas-warn", "gas_warn", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Warn when the settlement account can pay for fewer settlements than this.")
@click.option("--gas-fail", "gas_fail", type=click.IntRange(min=0), default=10, show_default=True,
              help="Fail when the settlement account can pay for fewer settlements than this.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds per network call.")
def doctor(catalogs: tuple[Path, ...], output: str, gas_warn: int, gas_fail: int, timeout: float) -> None:
    """Check the chains, tokens, gas, facilitators, database, store and keys this gateway uses.

    Exit 0: all passed; 1: failures; 2: warnings only."""
    from gateway.cli.settings_errors import load_settings
    from gateway.ops.doctor import GasThresholds, plan_from_settings, run_doctor

    if gas_warn < gas_fail:
        raise click.BadParameter("--gas-warn must be at least --gas-fail", param_hint="--gas-warn")
    # Bad settings: one line with a code, no value (the settings' checks never quote a secret).
    settings = load_settings({"catalog": list(catalogs)} if catalogs else {}, exit_status=1)
    try:  # the catalog as `serve` reads it: ${NAME} from this environment
        loaded = load_catalogs(settings.catalog, env=os.environ)
    except CatalogError as exc:
        click.echo(f"error: the catalog is invalid (fix: `x402gw catalog validate`)\n{exc}", err=True)
        sys.exit(1)
    plan = plan_from_settings(settings, loaded)
    report = asyncio.run(run_doctor(plan, thresholds=GasThresholds(gas_warn, gas_fail), timeout=timeout))
    click.echo(report.render_json() if output == "json" else report.render_text())
    sys.exit(report.exit_status)
