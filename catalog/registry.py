"""Networks and their stablecoins, by name: what lets a catalog say ``network: base``,
``asset: USDC`` and ``price: "$0.01"``.

Data only (no I/O). Each network has its CAIP-2 id and the names a catalog may use for it (the
x402 v1 names where x402 has one); each stablecoin its address, EIP-712 domain name and version,
decimals and the currency it is pegged to. Every entry cites where its facts come from:

- ``x402 SDK``: the official x402 Python SDK 2.25.0, ``x402/mechanisms/evm/default_assets.py``
  (``DEFAULT_ASSETS``); a test compares this table with it for every network both have.
- ``Circle USDC``: https://developers.circle.com/stablecoins/usdc-contract-addresses
- ``Circle EURC``: https://developers.circle.com/stablecoins/eurc-contract-addresses
  (addresses; the EIP-712 name ``EURC`` and version ``2`` are those of Circle's FiatToken v2.2
  deployments of EURC; ``x402gw catalog validate --check-chain RPC`` reads them from the chain.)
- ``x402gw devchain``: the local chain's test token (``contracts/TestUSDC.sol``), deployed by
  anvil account 0 as its first transaction, so always at the same address on a fresh anvil.

The local chain's entries are defaults, not facts: the gateway may put the deployment file's
token in their place (``with_local_token``), and a catalog's explicit address there is never
checked against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "LOCAL_NETWORK",
    "NETWORKS",
    "NetworkInfo",
    "Stablecoin",
    "find_network",
    "network_names",
    "resolve_network",
    "stablecoin",
    "stablecoin_at",
    "with_local_token",
]

LOCAL_NETWORK = "eip155:31337"


@dataclass(frozen=True, slots=True)
class Stablecoin:
    symbol: str  # what a catalog writes: asset: USDC
    address: str  # EIP-55 checksummed
    name: str  # EIP-712 domain name (what name() answers)
    version: str  # EIP-712 domain version
    decimals: int
    currency: str  # ISO 4217 code of the peg: "USD", "EUR"
    source: str  # where these facts come from (see the module docstring)


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    chain_id: int
    names: tuple[str, ...]  # aliases a catalog may write; the first is the canonical one
    title: str
    testnet: bool
    local: bool = False  # anvil's chain: its stablecoins are the devchain's defaults
    stablecoins: tuple[Stablecoin, ...] = field(default=())

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"

    @property
    def name(self) -> str:
        return self.names[0]


def _usdc(address: str, name: str, source: str = "x402 SDK", *, version: str = "2") -> Stablecoin:
    return Stablecoin("USDC", address, name, version, 6, "USD", source)


def _eurc(address: str) -> Stablecoin:
    return Stablecoin("EURC", address, "EURC", "2", 6, "EUR", "Circle EURC")


NETWORKS: tuple[NetworkInfo, ...] = (
    # -- Base
    NetworkInfo(8453, ("base",), "Base", False, stablecoins=(
        _usdc("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),  # x402 SDK; Circle USDC
        _eurc("0x60a3E35Cc302bFA44Cb288Bc5a4F316Fdb1adb42"),  # Circle EURC (Base)
    )),
    NetworkInfo(84532, ("base-sepolia",), "Base Sepolia", True, stablecoins=(
        _usdc("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),  # x402 SDK; Circle USDC
        _eurc("0x808456652fdb597867f38412077A9182bf77359F"),  # Circle EURC (Base Sepolia)
    )),
    # -- Ethereum
    NetworkInfo(1, ("ethereum", "mainnet"), "Ethereum", False, stablecoins=(
        _usdc("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"),  # x402 SDK; Circle USDC
        _eurc("0x1aBaEA1f7C830bD89Acc67eC4af516284b1bC33c"),  # Circle EURC (Ethereum)
    )),
    NetworkInfo(11155111, ("ethereum-sepolia", "sepolia"), "Ethereum Sepolia", True, stablecoins=(
        _usdc("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238", "USDC", "Circle USDC"),  # Circle USDC (Ethereum Sepolia)
        _eurc("0x08210F9170F89Ab7658F0B5E3fF39b0E03C594D4"),  # Circle EURC (Ethereum Sepolia)
    )),
    # -- other networks the SDK has a USDC (EIP-3009) for
    NetworkInfo(137, ("polygon",), "Polygon PoS", False, stablecoins=(
        _usdc("0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin"),  # x402 SDK; Circle USDC
    )),
    NetworkInfo(42161, ("arbitrum", "arbitrum-one"), "Arbitrum One", False, stablecoins=(
        _usdc("0xaf88d065e77c8cC2239327C5EDb3A432268e5831", "USD Coin"),  # x402 SDK; Circle USDC
    )),
    NetworkInfo(421614, ("arbitrum-sepolia",), "Arbitrum Sepolia", True, stablecoins=(
        _usdc("0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", "USD Coin"),  # x402 SDK; Circle USDC
    )),
    NetworkInfo(43114, ("avalanche",), "Avalanche C-Chain", False, stablecoins=(
        _usdc("0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E", "USD Coin"),  # x402 SDK; Circle USDC
    )),
    NetworkInfo(143, ("monad",), "Monad", False, stablecoins=(
        _usdc("0x754704Bc059F8C67012fEd69BC8A327a5aafb603", "USDC"),  # x402 SDK
    )),
    NetworkInfo(10143, ("monad-testnet",), "Monad Testnet", True, stablecoins=(
        _usdc("0x534b2f3A21130d7a60830c2Df862319e593943A3", "USDC"),  # x402 SDK
    )),
    NetworkInfo(1329, ("sei",), "Sei", False, stablecoins=(
        _usdc("0xe15fC38F6D8c56aF07bbCBe3BAf5708A2Bf42392", "USDC"),  # x402 SDK
    )),
    NetworkInfo(1328, ("sei-testnet",), "Sei Testnet", True, stablecoins=(
        _usdc("0x4fCF1784B31630811181f670Aea7A7bEF803eaED", "USDC"),  # x402 SDK
    )),
    NetworkInfo(42220, ("celo",), "Celo", False, stablecoins=(
        _usdc("0xcebA9300f2b948710d2653dD7B07f33A8B32118C", "USDC"),  # x402 SDK
    )),
    NetworkInfo(11142220, ("celo-sepolia",), "Celo Sepolia", True, stablecoins=(
        _usdc("0x01C5C0122039549AD1493B8220cABEdD739BC44E", "USDC"),  # x402 SDK
    )),
    # -- networks x402 names (v1 names) without a stablecoin here: a catalog on them writes the
    # token's address, asset_name, asset_version and decimals itself
    NetworkInfo(80002, ("polygon-amoy",), "Polygon Amoy", True),
    NetworkInfo(43113, ("avalanche-fuji",), "Avalanche Fuji", True),
    NetworkInfo(2741, ("abstract",), "Abstract", False),
    NetworkInfo(11124, ("abstract-testnet",), "Abstract Testnet", True),
    NetworkInfo(4689, ("iotex",), "IoTeX", False),
    NetworkInfo(3338, ("peaq",), "peaq", False),
    NetworkInfo(1513, ("story",), "Story", False),
    NetworkInfo(656476, ("educhain",), "EDU Chain", False),
    NetworkInfo(1444673419, ("skale-base-sepolia",), "SKALE Base Sepolia", True),
    NetworkInfo(4326, ("megaeth",), "MegaETH", False),
    NetworkInfo(988, ("stable",), "Stable", False),
    NetworkInfo(2201, ("stable-testnet",), "Stable Testnet", True),
    NetworkInfo(14, ("flare",), "Flare", False),
    # -- the local chain: x402gw devchain (anvil, chain id 31337)
    NetworkInfo(31337, ("local", "devchain", "anvil"), "local dev chain (anvil)", True, local=True, stablecoins=(
        # x402gw devchain: TestUSDC("USD Coin", "USDC", "2"), 6 decimals, CREATE address of anvil
        # account 0's nonce 0 (settlement.chain.deployment.DEFAULT_TOKEN_ADDRESS)
        _usdc("0x5FbDB2315678afecb367f032d93F642f64180aa3", "USD Coin", "x402gw devchain"),
    )),
)

_BY_NAME: dict[str, NetworkInfo] = {alias: net for net in NETWORKS for alias in net.names}
_BY_CAIP2: dict[str, NetworkInfo] = {net.caip2: net for net in NETWORKS}


def network_names() -> list[str]:
    """Every name a catalog may write for a network, canonical names first."""
    return [net.name for net in NETWORKS] + [alias for net in NETWORKS for alias in net.names[1:]]


def find_network(network: str) -> NetworkInfo | None:
    """The registry's network for a CAIP-2 id or a name (``base``, ``eip155:8453``), or None."""
    return _BY_CAIP2.get(network) or _BY_NAME.get(network.strip().lower())


def resolve_network(network: str) -> str | None:
    """The CAIP-2 id of a name the registry knows (``base`` → ``eip155:8453``), or None."""
    info = _BY_NAME.get(network.strip().lower())
    return info.caip2 if info is not None else None


def _coins(network: str, local: Mapping[str, Iterable[Stablecoin]] | None) -> Iterable[Stablecoin]:
    if local is not None and network in local:
        return local[network]
    info = _BY_CAIP2.get(network)
    return info.stablecoins if info is not None else ()


def stablecoin(network: str, symbol: str, local: Mapping[str, Iterable[Stablecoin]] | None = None) -> Stablecoin | None:
    """The stablecoin ``symbol`` (any case) on the CAIP-2 ``network``, or None. ``local``: the
    stablecoins of some networks as a deployment file has them, in place of the registry's."""
    wanted = symbol.upper()
    return next((coin for coin in _coins(network, local) if coin.symbol == wanted), None)


def stablecoin_at(network: str, address: str, local: Mapping[str, Iterable[Stablecoin]] | None = None) -> Stablecoin | None:
    """The stablecoin at ``address`` (any case) on the CAIP-2 ``network``, or None."""
    wanted = address.lower()
    return next((coin for coin in _coins(network, local) if coin.address.lower() == wanted), None)


def with_local_token(
    network: str, address: str, name: str, version: str, decimals: int, symbol: str = "USDC", source: str = "deployment file"
) -> dict[str, tuple[Stablecoin, ...]]:
    """A ``local`` mapping for ``stablecoin``/``stablecoin_at`` and the loader: the dev chain's
    token as its deployment file names it (pegged to the dollar, as the test USDC is)."""
    return {network: (Stablecoin(symbol.upper(), address, name, version, decimals, "USD", source),)}
