"""Token facts the agent trusts: read from the chain at an RPC it names, or pinned (Circle's USDC).

Never taken from the gateway it pays: an offer is checked against these facts, not the other way.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from settlement.chain.addresses import checksum_address
from settlement.chain.networks import to_caip2

__all__ = [
    "ADDRESS",
    "PINNED_TOKENS",
    "TokenFacts",
    "TokenUnverifiable",
    "chain_network",
    "pinned_token",
    "read_token_facts",
]

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class TokenUnverifiable(Exception):
    """Token facts could not be established from the chain or the pinned list."""



@dataclass(frozen=True)
class TokenFacts:
    """What the agent knows about the token it pays in, from a source it trusts."""

    network: str  # CAIP-2, eip155:<chain id>
    address: str  # checksummed
    name: str  # EIP-712 domain name
    version: str  # EIP-712 domain version
    decimals: int
    source: str  # "chain <rpc url>" or "pinned"

    def same_token(self, network: str, asset: str) -> bool:
        return network == self.network and asset.lower() == self.address.lower()


def _pinned(network: str, address: str, name: str) -> tuple[tuple[str, str], TokenFacts]:
    return (network, address.lower()), TokenFacts(network, checksum_address(address), name, "2", 6, "pinned")


# Circle's USDC (EIP-3009) on the networks x402 names: address, EIP-712 name/version, decimals.
PINNED_TOKENS: dict[tuple[str, str], TokenFacts] = dict([
    _pinned("eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),  # Base
    _pinned("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),  # Base Sepolia
    _pinned("eip155:1", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"),  # Ethereum
    _pinned("eip155:137", "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin"),  # Polygon
    _pinned("eip155:42161", "0xaf88d065e77c8cC2239327C5EDb3A432268e5831", "USD Coin"),  # Arbitrum One
    _pinned("eip155:421614", "0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", "USD Coin"),  # Arbitrum Sepolia
])


def pinned_token(network: str, asset: str | None = None) -> TokenFacts | None:
    """The pinned facts of ``asset`` on ``network`` (default: that network's USDC), or None."""
    caip2 = to_caip2(network) or network
    if asset is not None:
        return PINNED_TOKENS.get((caip2, asset.lower()))
    return next((facts for (net, _), facts in PINNED_TOKENS.items() if net == caip2), None)


async def _rpc(http: httpx.AsyncClient, rpc_url: str, method: str, params: list[Any]) -> Any:
    reply = await http.post(rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    reply.raise_for_status()
    data = reply.json()
    if not isinstance(data, dict) or "error" in data or "result" not in data:
        raise TokenUnverifiable(f"{method} failed at {rpc_url}: {data.get('error') if isinstance(data, dict) else data}")
    return data["result"]



async def read_token_facts(rpc_url: str, asset: str, *, network: str | None = None, timeout: float = 10.0) -> TokenFacts:
    """Decimals and EIP-712 name/version of ``asset``, read from the chain at ``rpc_url``.

    ``network`` (CAIP-2 or a v1 name), when given, must be the chain the RPC serves. Reads
    ``eip712Domain()`` (EIP-5267) when the token has it, else ``name()`` and ``version()``.
    """
    from eth_abi import decode as abi_decode
    from eth_abi.exceptions import DecodingError

    from settlement.chain.client import SEL_DECIMALS, SEL_NAME, SEL_VERSION

    if not ADDRESS.fullmatch(asset):
        raise TokenUnverifiable(f"{asset!r} is not a token address")
    address = checksum_address(asset)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            chain_id = int(str(await _rpc(http, rpc_url, "eth_chainId", [])), 16)
            served = f"eip155:{chain_id}"
            if network is not None and (to_caip2(network) or network) != served:
                raise TokenUnverifiable(
                    f"the RPC at {rpc_url} serves chain id {chain_id} ({served}), not {network}"
                )
            code = await _rpc(http, rpc_url, "eth_getCode", [address, "latest"])
            if not isinstance(code, str) or code in ("0x", "0x0", ""):
                raise TokenUnverifiable(f"no contract at {address} on {served}")

            async def call(data: bytes) -> bytes:
                out = await _rpc(http, rpc_url, "eth_call", [{"to": address, "data": "0x" + data.hex()}, "latest"])
                return bytes.fromhex(str(out)[2:])

            name, version = await _domain(call, address, chain_id, served)
            if name is None or version is None:
                name = str(abi_decode(["string"], await call(SEL_NAME))[0])
                version = str(abi_decode(["string"], await call(SEL_VERSION))[0])
            raw_decimals = await call(SEL_DECIMALS)
            decimals = int.from_bytes(raw_decimals[:32], "big") if len(raw_decimals) >= 32 else -1
    except httpx.HTTPError as exc:
        raise TokenUnverifiable(f"the RPC at {rpc_url} did not answer: {type(exc).__name__}") from None
    except (DecodingError, ValueError) as exc:
        raise TokenUnverifiable(f"{address} on {rpc_url} does not read as an EIP-3009 token: {exc}") from None
    if not 0 <= decimals <= 36:
        raise TokenUnverifiable(f"{address} on {served} reports {decimals} decimals")
    facts = TokenFacts(served, address, name, version, decimals, f"chain {rpc_url}")
    _check_pinned(facts, rpc_url)
    return facts


async def _domain(
    call: Callable[[bytes], Awaitable[bytes]], address: str, chain_id: int, served: str
) -> tuple[str | None, str | None]:
    """Name and version from ``eip712Domain()`` (EIP-5267), or (None, None) when the token has none."""
    from eth_abi import decode as abi_decode

    from settlement.chain.client import selector

    try:
        raw_domain = await call(selector("eip712Domain()"))
    except TokenUnverifiable:  # reverted: the token has no EIP-5267 domain getter
        raw_domain = b""
    if not raw_domain:
        return None, None
    domain = abi_decode(["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"], raw_domain)
    if int(domain[3]) != chain_id or str(domain[4]).lower() != address.lower():
        raise TokenUnverifiable(
            f"the eip712Domain() of {address} names another chain or contract than {address} on {served}"
        )
    return str(domain[1]), str(domain[2])


def _check_pinned(facts: TokenFacts, rpc_url: str) -> None:
    """A chain that disagrees with the pinned list about a pinned token is not believed."""
    pinned = PINNED_TOKENS.get((facts.network, facts.address.lower()))
    if pinned is not None and (pinned.name, pinned.version, pinned.decimals) != (facts.name, facts.version, facts.decimals):
        raise TokenUnverifiable(
            f"the chain at {rpc_url} says {facts.address} is {facts.name!r}/{facts.version!r} with {facts.decimals} decimals; "
            f"the pinned list says {pinned.name!r}/{pinned.version!r} with {pinned.decimals}"
        )


async def chain_network(rpc_url: str, *, timeout: float = 10.0) -> str:
    """The CAIP-2 network the RPC at ``rpc_url`` serves (its ``eth_chainId``)."""
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            return f"eip155:{int(str(await _rpc(http, rpc_url, 'eth_chainId', [])), 16)}"
    except (httpx.HTTPError, ValueError) as exc:
        raise TokenUnverifiable(f"the RPC at {rpc_url} did not answer eth_chainId: {type(exc).__name__}") from None
