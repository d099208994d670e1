"""EIP-55 checksummed addresses, cached: eth_utils' conversion costs ≈0.25 ms (a keccak plus
validation), and a paid request checksums the same few addresses (payer, payee, token) many times."""

from __future__ import annotations

from functools import lru_cache

from eth_utils import to_checksum_address


@lru_cache(maxsize=65_536)
def checksum_address(address: str) -> str:
    """The EIP-55 form of a hex address; ``ValueError`` when it is not one (failures are not cached)."""
    return str(to_checksum_address(address))
