"""A rehearsal chain: anvil imitating a real network, so the very catalog that will go live
(``network: base-sepolia``, ``asset: USDC``, ``price: "$0.01"``) is exercised locally.

``x402gw devchain --rehearse base-sepolia`` starts anvil with that network's chain id (84532),
deploys TestUSDC under USDC's real EIP-712 name and version there, and puts its code at the
network's real USDC address with ``anvil_setCode``. setCode skips the constructor and copies no
storage, and the code carries the deployed copy's immutables, so:

- the string slots (``name``, ``symbol``, ``version``) are copied from the deployed copy with
  ``anvil_setStorageAt``, whatever their layout (a long string's data slots too);
- the cached EIP-712 domain separator (an immutable computed for the copy's own address) is
  replaced in the code by the separator of the real address; ``minter`` (account 0) and the
  cached chain id (this chain's) stay right as they are;
- then ``name()``, ``version()``, ``decimals()`` and ``DOMAIN_SEPARATOR()`` at the real address are
  read back and must be what the registry says (``catalog.registry``), or the set-up fails.

The deployment file marks the chain a rehearsal of that network (``Deployment.rehearsal``): the
gateway then allows the file's anvil dev key on that chain id, and only while every RPC URL of it
is on loopback and answers as anvil (``settlement.chain.deployment.rehearsal_deployment``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import Web3Exception

from catalog.registry import find_network, stablecoin
from gateway.devkit.devchain import (
    DEFAULT_MINT_ATOMIC,
    _deploy_token,
    _web3,
    fund_and_deploy,
    run_devchain,
)
from settlement.chain.deployment import (
    ANVIL_KEYS,
    DEFAULT_DEPLOYMENT_PATH,
    Deployment,
    DevchainError,
    TokenInfo,
)
from settlement.schemes.eip712 import domain_separator

__all__ = ["rehearsable_networks", "run_rehearsal", "setup_rehearsal"]

_STRING_SLOTS = (0, 1, 2)  # TestUSDC's name, symbol, version (checked by reading them back)


def rehearsable_networks() -> list[str]:
    """Names of the networks a rehearsal can imitate: those with a USDC in the registry."""
    from catalog.registry import NETWORKS

    return [net.name for net in NETWORKS if not net.local and any(c.symbol == "USDC" for c in net.stablecoins)]


def _target(network: str) -> tuple[int, str, Any]:
    info = find_network(network)
    coin = stablecoin(info.caip2, "USDC") if info is not None else None
    if info is None or info.local or coin is None:
        raise DevchainError(
            f"cannot rehearse {network!r}: name a network with a USDC in the registry "
            f"({', '.join(rehearsable_networks())})",
            code="rehearsal_unknown_network",
        )
    return info.chain_id, info.name, coin


def _rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    try:
        reply = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"{method} failed on the rehearsal chain: {exc}", code="chain_unreachable") from exc
    if "error" in reply:
        raise DevchainError(f"{method} failed on the rehearsal chain: {reply['error']}", code="transaction_failed")
    return reply.get("result")


def _call(w3: Web3, to: str, signature: str) -> bytes:
    data = "0x" + keccak(text=signature)[:4].hex()
    return bytes.fromhex(str(_rpc(w3, "eth_call", [{"to": to, "data": data}, "latest"]))[2:])


def _copy_string_slots(w3: Web3, source: str, target: str) -> None:
    for slot in _STRING_SLOTS:
        word = str(_rpc(w3, "eth_getStorageAt", [source, hex(slot), "latest"]))
        value = int(word, 16)
        _rpc(w3, "anvil_setStorageAt", [target, hex(slot), "0x" + f"{value:064x}"])
        if value & 1:  # a long string: 2 * length + 1 here, its bytes from keccak(slot) on
            base = int.from_bytes(keccak(slot.to_bytes(32, "big")), "big")
            for index in range(((value - 1) // 2 + 31) // 32):
                data = str(_rpc(w3, "eth_getStorageAt", [source, hex(base + index), "latest"]))
                _rpc(w3, "anvil_setStorageAt", [target, hex(base + index), "0x" + f"{int(data, 16):064x}"])


def place_token(w3: Web3, address: str, name: str, version: str, chain_id: int) -> None:
    """TestUSDC with EIP-712 ``name``/``version`` at ``address`` (setCode), checked by reading back."""
    template, _ = _deploy_token(w3, ANVIL_KEYS[0], name, "USDC", version)
    code = bytes(w3.eth.get_code(Web3.to_checksum_address(template)))
    wrong = _call(w3, template, "DOMAIN_SEPARATOR()")
    right = domain_separator(name, version, chain_id, address)
    _rpc(w3, "anvil_setCode", [address, "0x" + code.replace(wrong, right).hex()])
    _copy_string_slots(w3, template, address)
    found = (
        str(abi_decode(["string"], _call(w3, address, "name()"))[0]),
        str(abi_decode(["string"], _call(w3, address, "version()"))[0]),
        int.from_bytes(_call(w3, address, "decimals()")[:32], "big"),
        _call(w3, address, "DOMAIN_SEPARATOR()"),
    )
    if found != (name, version, 6, right):
        raise DevchainError(
            f"the token placed at {address} reads {found[:3]} with another domain separator; expected "
            f"({name!r}, {version!r}, 6): has contracts/TestUSDC.sol changed its storage layout?",
            code="rehearsal_token_mismatch",
        )


def setup_rehearsal(rpc_url: str, network: str, mint_atomic: int = DEFAULT_MINT_ATOMIC) -> Deployment:
    """On an anvil started with ``network``'s chain id: its USDC at the real address, accounts 1..9
    funded, the batch settler and wallet contracts deployed; the deployment marked a rehearsal."""
    chain_id, name, coin = _target(network)
    w3 = _web3(rpc_url)
    served = int(_rpc(w3, "eth_chainId", []), 16)
    if served != chain_id:
        raise DevchainError(
            f"the chain at {rpc_url} has chain id {served}, a rehearsal of {name} needs {chain_id}",
            code="rehearsal_chain_id_mismatch",
        )
    place_token(w3, coin.address, coin.name, coin.version, chain_id)
    token = TokenInfo(address=coin.address, name=coin.name, symbol="USDC", version=coin.version, decimals=coin.decimals)
    return fund_and_deploy(w3, rpc_url, chain_id, token, mint_atomic, rehearsal=name)


def run_rehearsal(
    network: str,
    port: int = 8545,
    deployment_path: str | os.PathLike[str] = DEFAULT_DEPLOYMENT_PATH,
    anvil_path: str | None = None,
    echo: Callable[[str], object] = print,
    **kwargs: Any,
) -> int:
    """``x402gw devchain --rehearse NETWORK``: ``run_devchain`` with that network's chain id and set-up."""
    try:
        chain_id, name, _ = _target(network)
    except DevchainError as exc:
        echo(f"devchain error ({exc.code}): {exc}")
        return 2
    setup = functools.partial(_setup_for, name)
    return run_devchain(port=port, deployment_path=deployment_path, anvil_path=anvil_path, echo=echo,
                        chain_id=chain_id, setup=setup, **kwargs)


def _setup_for(network: str, rpc_url: str, mint_atomic: int) -> Deployment:
    return setup_rehearsal(rpc_url, network, mint_atomic)
