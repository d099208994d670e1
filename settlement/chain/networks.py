"""Network names: CAIP-2 (``eip155:<chain id>``, x402 v2) and the legacy v1 names."""

from __future__ import annotations

from settlement.x402.digits import is_digits

LEGACY_CHAIN_IDS: dict[str, int] = {
    "base": 8453,
    "base-sepolia": 84532,
    "ethereum": 1,
    "polygon": 137,
    "polygon-amoy": 80002,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
    "abstract": 2741,
    "abstract-testnet": 11124,
    "iotex": 4689,
    "sei": 1329,
    "sei-testnet": 1328,
    "peaq": 3338,
    "story": 1513,
    "educhain": 656476,
    "skale-base-sepolia": 1444673419,
    "megaeth": 4326,
    "monad": 143,
    "monad-testnet": 10143,
    "stable": 988,
    "stable-testnet": 2201,
    "celo": 42220,
    "flare": 14,
}
_LEGACY_BY_CHAIN_ID = {chain_id: name for name, chain_id in LEGACY_CHAIN_IDS.items()}


def to_caip2(network: str) -> str | None:
    """CAIP-2 id for a v2 id or a legacy v1 name; None when unknown."""
    if network.startswith("eip155:") and is_digits(network[7:]):
        return network
    chain_id = LEGACY_CHAIN_IDS.get(network)
    return f"eip155:{chain_id}" if chain_id is not None else None


def to_legacy(network: str) -> str:
    """The v1 name of a CAIP-2 network when it has one (v1 clients know only those), else the id."""
    if network.startswith("eip155:") and is_digits(network[7:]):
        return _LEGACY_BY_CHAIN_ID.get(int(network[7:]), network)
    return network


def eip155_chain_id(network: str) -> int | None:
    """The chain id of a CAIP-2 ``eip155:<digits>`` network; None for anything else."""
    prefix, _, ident = network.partition(":")
    if prefix != "eip155" or not (ident.isascii() and ident.isdigit()):
        return None
    return int(ident)
