"""What a local (dev or rehearsal) chain holds, as written to ``var/devchain.json``: its RPC, the
token, the funded accounts, and anvil's public dev keys (which the gateway refuses off the local
chain). Production code reads deployments; ``gateway.devkit.devchain`` starts chains and writes them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from catalog.registry import Stablecoin, with_local_token
from settlement.errors import SettlementError

__all__ = [
    "ANVIL_ADDRESSES",
    "ANVIL_KEYS",
    "ANVIL_MNEMONIC",
    "DEFAULT_DEPLOYMENT_PATH",
    "DEFAULT_TOKEN_ADDRESS",
    "LOCAL_CHAIN_ID",
    "LOCAL_NETWORK",
    "Deployment",
    "DevchainError",
    "FundedAccount",
    "TokenInfo",
    "is_loopback_url",
    "local_tokens",
    "rehearsal_deployment",
]

LOCAL_CHAIN_ID = 31337
LOCAL_NETWORK = f"eip155:{LOCAL_CHAIN_ID}"

# Anvil's default accounts, derived from its default mnemonic (m/44'/60'/0'/0/i). They are public
# test keys, known to everyone: fine in the repository, fatal on any real network.
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
ANVIL_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
ANVIL_ADDRESSES: tuple[str, ...] = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
    "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc",
    "0x976EA74026E726554dB657fA54763abd0C3a0aa9",
    "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955",
    "0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f",
    "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
)

# CREATE address of account 0's first transaction (nonce 0): where the token lands on a fresh
# anvil. The example catalog names this address.
DEFAULT_TOKEN_ADDRESS = "0x5FbDB2315678afecb367f032d93F642f64180aa3"

DEFAULT_DEPLOYMENT_PATH = Path("var/devchain.json")


class DevchainError(SettlementError):
    """The dev chain could not be found, started, set up or read. ``code`` is stable:
    ``anvil_not_found``, ``anvil_start_failed``, ``chain_unreachable``, ``transaction_failed``,
    ``artifact_missing``, ``deployment_missing``, ``deployment_invalid``."""

    code = "devchain_error"


class TokenInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str
    name: str
    symbol: str
    version: str
    decimals: int


class FundedAccount(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    address: str
    private_key: str
    usdc_atomic: int


class Deployment(BaseModel):
    """What a dev chain holds, written to var/devchain.json for the gateway and for clients."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpc_url: str
    chain_id: int
    network: str
    token: TokenInfo
    deployer: str
    settlement_key: str  # anvil account 0: pays the gas of settlements (a public dev key)
    accounts: list[FundedAccount]
    # BatchSettler callable by the settlement account (batched settlement); absent in older files.
    batch_settler: str | None = None
    # A rehearsal chain (x402gw devchain --rehearse NAME): anvil with that network's chain id and
    # the test token at its real USDC address. None: the local chain (31337).
    rehearsal: str | None = None
    # Smart-wallet support (absent in older files): the SmartWalletFactory (CREATE2, ERC-6492
    # factory), the EIP-7702 delegate, and Multicall3 at its canonical address.
    wallet_factory: str | None = None
    eip7702_delegate: str | None = None
    multicall3: str | None = None
    # The x402 upto scheme's contracts at their canonical addresses (absent in older files):
    # Permit2 and x402UptoPermit2Proxy; funded accounts have approved Permit2 on the token.
    permit2: str | None = None
    upto_proxy: str | None = None
    # The x402 batch-settlement escrow at its canonical address, with its ERC-3009 deposit collector
    # (absent in older files).
    channel_escrow: str | None = None
    # x402 ``exact`` through Permit2 (absent in older files): x402ExactPermit2Proxy at its canonical
    # address, and a plain ERC-20 without EIP-3009 (version ""), minted to the funded accounts,
    # each of which has approved Permit2 on it.
    exact_proxy: str | None = None
    plain_token: TokenInfo | None = None

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: readers see the old file or the new one, never half of one."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.model_dump_json(indent=2) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Deployment:
        source = Path(path)
        if source.exists() and not source.is_file():  # a FIFO would be waited on, /dev/zero read for ever
            raise DevchainError(f"{source} is not a regular file", code="deployment_invalid")
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DevchainError(
                f"no dev chain deployment at {source}: start one with `x402gw devchain`",
                code="deployment_missing",
            ) from exc
        except OSError as exc:
            raise DevchainError(f"cannot read {source}: {exc}", code="deployment_invalid") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise DevchainError(
                f"{source} is not a valid dev chain deployment ({exc.error_count()} errors); "
                "delete it and restart `x402gw devchain`",
                code="deployment_invalid",
            ) from exc


def is_loopback_url(url: str) -> bool:
    """An http(s) URL whose host is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client_version(rpc_url: str, timeout: float = 3.0) -> str | None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "web3_clientVersion", "params": []}).encode()
    request = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
    try:
        # No proxy: the question is what answers on this machine's loopback.
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout) as response:
            result = json.load(response).get("result")
    except (OSError, ValueError, AttributeError, urllib.error.URLError):
        return None
    return result if isinstance(result, str) else None


def rehearsal_deployment(path: str | os.PathLike[str], network: str, rpc_urls: Sequence[str]) -> Deployment | None:
    """The deployment of a rehearsal of ``network`` (a real network's chain id on a local anvil),
    or None. All of it must hold: the deployment file marks a rehearsal of exactly this network,
    every RPC URL of the network (the deployment's own when none is configured) is on loopback,
    and each answers ``web3_clientVersion`` as anvil. Only then may anvil's public dev keys settle
    on a chain id that is not the local one; anywhere else the gateway refuses them."""
    try:
        deployment = Deployment.read(path)
    except (DevchainError, UnicodeDecodeError):
        return None
    if not deployment.rehearsal or deployment.network != network or network == LOCAL_NETWORK:
        return None
    urls = list(rpc_urls) or [deployment.rpc_url]
    if not all(is_loopback_url(url) for url in urls):
        return None
    if not all((_client_version(url) or "").lower().startswith("anvil/") for url in urls):
        return None
    return deployment


def local_tokens(path: str | os.PathLike[str]) -> dict[str, tuple[Stablecoin, ...]] | None:
    """The local chain's test token as the deployment file names it, for the catalog loader's
    ``local=`` (``asset: USDC`` on eip155:31337 is the deployed token); None without a readable
    local deployment (a rehearsal's token is at the real address the registry already has)."""
    try:
        deployment = Deployment.read(path)
    except (DevchainError, UnicodeDecodeError):
        return None
    if deployment.rehearsal or deployment.network != LOCAL_NETWORK:
        return None
    token = deployment.token
    return with_local_token(deployment.network, token.address, token.name, token.version, token.decimals,
                            token.symbol, f"deployment file {path}")
