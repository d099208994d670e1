"""The x402gw command: catalog validation, refusing to start on bad configuration, the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from catalog import load_catalogs
from gateway.app import GatewayConfigError, create_app
from gateway.cli.main import main
from gateway.devkit.devchain import ANVIL_KEYS
from gateway.settings import DEFAULT_CATALOG, Settings

REPO = Path(__file__).resolve().parents[3]


def test_catalog_validate_accepts_the_examples() -> None:
    result = CliRunner().invoke(main, ["catalog", "validate", str(DEFAULT_CATALOG), str(DEFAULT_CATALOG.with_name("minimal.yaml"))])
    assert result.exit_code == 0, result.output
    assert "ok, owner acme-legacy, 5 tools" in result.output
    assert "get_quote" in result.output and "(2000 atomic)" in result.output


def test_catalog_validate_names_file_field_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = DEFAULT_CATALOG.read_text().replace("price: 0.002", "price: 0.0000001", 1)
    bad.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "price: 0.0000001" in l)
    result = CliRunner().invoke(main, ["catalog", "validate", str(bad)])
    assert result.exit_code == 1
    assert f"bad.yaml:{line}: tools[0].price:" in result.output
    assert "Traceback" not in result.output


def test_serve_refuses_an_invalid_catalog(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(DEFAULT_CATALOG.read_text().replace("    method: GET\n", "    methd: GET\n", 1))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--catalog", str(bad), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "the gateway will not start" in result.stderr
    assert re.search(r"typo\.yaml:\d+: tools\[0\]\.methd:", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_dev_keys_are_refused_on_any_chain_but_the_local_one(tmp_path: Path) -> None:
    catalog = tmp_path / "base.yaml"
    catalog.write_text(DEFAULT_CATALOG.read_text().replace('"eip155:31337"', '"eip155:8453"'))
    settings = Settings(
        catalog=[catalog],
        rpc_urls={"eip155:8453": "http://127.0.0.1:1"},
        settlement_key=ANVIL_KEYS[0],
        database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}",
    )
    with pytest.raises(GatewayConfigError) as info:
        create_app(settings, catalogs=load_catalogs(settings.catalog))
    assert info.value.code == "dev_key_on_public_chain"
    assert ANVIL_KEYS[0] not in str(info.value)


def test_missing_devchain_deployment_is_a_clear_refusal(tmp_path: Path) -> None:
    settings = Settings(deployment_file=tmp_path / "none.json", database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}")
    with pytest.raises(GatewayConfigError) as info:
        create_app(settings)
    assert info.value.code == "deployment_missing"
    assert "x402gw devchain" in str(info.value)


@pytest.mark.e2e
def test_demo_prints_settlement_transactions(tmp_path: Path) -> None:
    """The Quick start's first command, bounded: at least three settled calls with tx hashes."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "demo", "--exit-after-calls", "--port", "0", "--calls", "4",
         "--upstream-port", "0", "--warehouse-port", "0"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hashes = re.findall(r"HTTP 20[01]  tx (0x[0-9a-f]{64})", result.stdout)
    assert len(set(hashes)) >= 3, result.stdout
    assert "ledger: 4 settled payments" in result.stdout


def _supported_server(kinds: list[dict[str, object]]) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from gateway.ops.serving import ThreadServer

    async def supported(request: object) -> JSONResponse:
        return JSONResponse({"kinds": kinds, "extensions": [], "signers": {}})

    return ThreadServer(Starlette(routes=[Route("/supported", supported)])).start()


@pytest.mark.parametrize(
    ("kinds", "code"),
    [([{"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}], "facilitator_unsupported_network"),
     ([{"x402Version": 2, "scheme": "exact", "network": "eip155:31337"}], None)],
    ids=["unsupported", "supported"],
)
def test_remote_facilitator_must_support_every_route_at_start_up(
    tmp_path: Path, kinds: list[dict[str, object]], code: str | None
) -> None:
    import asyncio

    server = _supported_server(kinds)
    try:
        settings = Settings(facilitator_url=server.url, deployment_file=tmp_path / "none.json",
                            database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}")
        app = create_app(settings)

        async def start() -> None:
            async with app.router.lifespan_context(app):
                pass

        if code is None:
            asyncio.run(start())
        else:
            with pytest.raises(GatewayConfigError) as info:
                asyncio.run(start())
            assert info.value.code == code and "eip155:31337" in str(info.value)
    finally:
        server.stop()
