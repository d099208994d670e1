"""The registry of networks and stablecoins (catalog.registry): every entry well formed, and the
official x402 SDK's default-asset table agreeing with it wherever both name a network's coin."""

from __future__ import annotations

import re

import pytest
from eth_utils import to_checksum_address
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS

from catalog.registry import (
    NETWORKS,
    find_network,
    network_names,
    resolve_network,
    stablecoin,
    stablecoin_at,
    with_local_token,
)
from settlement.chain.deployment import DEFAULT_TOKEN_ADDRESS, LOCAL_CHAIN_ID

SOURCES = {"x402 SDK", "Circle USDC", "Circle EURC", "x402gw devchain"}


def test_every_entry_is_well_formed() -> None:
    chain_ids = [net.chain_id for net in NETWORKS]
    assert len(chain_ids) == len(set(chain_ids)), "a chain id listed twice"
    names = network_names()
    assert len(names) == len(set(names)), "a network name used twice"
    for net in NETWORKS:
        assert net.chain_id > 0 and net.caip2 == f"eip155:{net.chain_id}"
        assert net.names and all(re.fullmatch(r"[a-z][a-z0-9-]*", name) for name in net.names), net
        assert net.title
        symbols = [coin.symbol for coin in net.stablecoins]
        assert len(symbols) == len(set(symbols)), net
        for coin in net.stablecoins:
            assert re.fullmatch(r"0x[0-9a-fA-F]{40}", coin.address) and coin.address == to_checksum_address(coin.address), coin
            assert int(coin.address, 16) != 0
            assert coin.symbol == coin.symbol.upper() and coin.symbol in {"USDC", "EURC"}
            assert coin.name and coin.version and 0 <= coin.decimals <= 36
            assert coin.currency == {"USDC": "USD", "EURC": "EUR"}[coin.symbol]
            assert coin.source in SOURCES, coin


def test_the_sdk_default_assets_agree_with_ours() -> None:
    """For every network both tables have, the SDK's USDC is ours, fact for fact."""
    compared = 0
    for net in NETWORKS:
        for entry in DEFAULT_ASSETS.get(net.caip2, []):
            ours = stablecoin(net.caip2, entry["symbol"])
            if ours is None:
                continue
            compared += 1
            assert (ours.address, ours.name, ours.version, ours.decimals) == (
                entry["asset"], entry["name"], entry["version"], entry["decimals"]
            ), net.caip2
    assert compared >= 12  # base, base-sepolia, ethereum, polygon, arbitrum(-sepolia), avalanche, ...
    # and every coin we say the SDK gave us is in its table
    for net in NETWORKS:
        for coin in net.stablecoins:
            if coin.source == "x402 SDK":
                assert any(e["asset"] == coin.address for e in DEFAULT_ASSETS[net.caip2]), net.caip2


def test_network_names_are_x402s_v1_names() -> None:
    for name, chain_id in V1_NETWORK_CHAIN_IDS.items():
        assert resolve_network(name) == f"eip155:{chain_id}", name


def test_lookups() -> None:
    assert resolve_network("base") == "eip155:8453" and resolve_network("Base-Sepolia") == "eip155:84532"
    assert resolve_network("eip155:8453") is None and resolve_network("nowhere") is None
    assert find_network("eip155:84532") is find_network("base-sepolia")
    usdc = stablecoin("eip155:84532", "usdc")
    assert usdc is not None and usdc.name == "USDC" and usdc.address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert stablecoin_at("eip155:84532", usdc.address.lower()) == usdc
    assert stablecoin("eip155:137", "EURC") is None and stablecoin("eip155:999999", "USDC") is None


@pytest.mark.parametrize("symbol", ["USDC"])
def test_the_local_chain_is_the_devchain(symbol: str) -> None:
    coin = stablecoin(f"eip155:{LOCAL_CHAIN_ID}", symbol)
    assert coin is not None and coin.address == DEFAULT_TOKEN_ADDRESS and (coin.name, coin.version) == ("USD Coin", "2")
    local = with_local_token("eip155:31337", "0x" + "ab" * 20, "Other", "3", 6)
    moved = stablecoin("eip155:31337", symbol, local)
    assert moved is not None and (moved.address, moved.name, moved.version) == ("0x" + "ab" * 20, "Other", "3")
