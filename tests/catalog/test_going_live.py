"""catalog/examples/going-live.yaml, the README's "Going live" catalog: the very same file resolves,
under the environment of each step (a rehearsal of Base Sepolia, Base Sepolia, Base mainnet), to
the registry's USDC of that step's network, at a dollar price, paying that step's payee; and
`x402gw catalog validate` prints what the current environment makes of it. The rehearsal serving
a paid call from this file on anvil: tests/e2e/test_rehearsal.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import catalog
from catalog import CatalogError, load_catalogs
from catalog.registry import stablecoin
from gateway.cli.main import main

GOING_LIVE = Path(catalog.__file__).parent / "examples" / "going-live.yaml"
TEST_PAYEE = "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955"
LIVE_PAYEE = "0x2546BcD3c84621e976D8185a91A922aE77ECEc30"

# step → (its environment, the network it must resolve to)
STEPS = {
    "rehearsal": ({"X402GW_NETWORK": "base-sepolia", "X402GW_PAY_TO": TEST_PAYEE,
                   "X402GW_UPSTREAM_URL": "http://127.0.0.1:9101"}, "eip155:84532"),
    "base-sepolia": ({"X402GW_PAY_TO": TEST_PAYEE, "X402GW_UPSTREAM_URL": "https://api.example.com"}, "eip155:84532"),
    "base": ({"X402GW_NETWORK": "base", "X402GW_PAY_TO": LIVE_PAYEE,
              "X402GW_UPSTREAM_URL": "https://api.example.com"}, "eip155:8453"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_the_same_file_resolves_to_each_networks_usdc(step: str) -> None:
    env, network = STEPS[step]
    usdc = stablecoin(network, "USDC")
    assert usdc is not None
    [tool] = load_catalogs([GOING_LIVE], env=env).tools
    terms = tool.payment
    assert (terms.network, terms.asset, terms.asset_name, terms.asset_version, terms.decimals) == (
        network, usdc.address, usdc.name, usdc.version, usdc.decimals)
    assert terms.pay_to == env["X402GW_PAY_TO"] and tool.price_atomic == 10_000  # "$0.01"
    assert tool.upstream.base_url.rstrip("/") == env["X402GW_UPSTREAM_URL"]


def test_base_and_base_sepolia_are_different_tokens() -> None:
    sepolia, mainnet = (load_catalogs([GOING_LIVE], env=STEPS[s][0]).tools[0].payment for s in ("base-sepolia", "base"))
    assert sepolia.asset != mainnet.asset and sepolia.asset_name != mainnet.asset_name  # "USDC" / "USD Coin"


def test_the_payee_has_no_default() -> None:
    text = GOING_LIVE.read_text()
    line = next(n for n, written in enumerate(text.splitlines(), 1) if "pay_to:" in written)
    with pytest.raises(CatalogError) as info:
        load_catalogs([GOING_LIVE], env={"X402GW_NETWORK": "base"})
    assert [(i.line, i.path, i.code) for i in info.value.issues] == [(line, "payment.pay_to", "undefined_variable")]
    assert "X402GW_PAY_TO" in info.value.issues[0].message


@pytest.mark.parametrize("step", ["base-sepolia", "base"])
def test_catalog_validate_prints_the_offer_of_the_current_environment(step: str, tmp_path: Path) -> None:
    env, network = STEPS[step]
    usdc = stablecoin(network, "USDC")
    assert usdc is not None
    result = CliRunner().invoke(main, ["catalog", "validate", str(GOING_LIVE), "--deployment", str(tmp_path / "none.json")],
                                env={"X402GW_NETWORK": None, **env})
    assert result.exit_code == 0, result.output
    assert f"exact on {network} ({step}), asset USDC {usdc.address}" in result.output
    assert f"pay to {env['X402GW_PAY_TO']}" in result.output and "$0.01 = 0.01 USDC (10000 atomic)" in result.output


def test_catalog_validate_names_an_unset_variable_at_its_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["catalog", "validate", str(GOING_LIVE), "--deployment", str(tmp_path / "none.json")],
                                env={"X402GW_PAY_TO": None, "X402GW_NETWORK": "base"})
    assert result.exit_code == 1
    assert "going-live.yaml:" in result.output and "payment.pay_to: ${X402GW_PAY_TO} is not set" in result.output
    assert "Traceback" not in result.output
