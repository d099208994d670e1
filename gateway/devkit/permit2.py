"""Permit2 and the x402 ``upto`` and ``exact`` proxies on the dev chain, at the addresses the x402
SDK hard-codes.

The contracts (``contracts/Permit2.sol``, ``contracts/X402UptoPermit2Proxy.sol``,
``contracts/X402ExactPermit2Proxy.sol``) are written so
their runtime code alone works: no constructor state, no immutables (Permit2 computes its EIP-712
domain from ``address(this)`` per call; the proxies name Permit2 as a constant). So placing them is
an ``eth_call`` of the creation code (which returns the runtime code, sending nothing) and
``anvil_setCode``: no transaction, no deployer nonce, no block, so every other address and block of
the dev chain stays where it was. The funded accounts' ERC-20 approval of Permit2 (what a payer
does once, on a public chain, before any ``upto`` payment) is written straight into TestUSDC's
``_allowances`` slot with ``anvil_setStorageAt`` for the same reason, and read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from eth_abi import encode as abi_encode
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import Web3Exception
from x402.mechanisms.evm.constants import (
    PERMIT2_ADDRESS,
    X402_EXACT_PERMIT2_PROXY_ADDRESS,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
)

from settlement.chain.deployment import DevchainError

__all__ = [
    "EXACT_PROXY_ADDRESS", "PERMIT2_ADDRESS", "UPTO_PROXY_ADDRESS", "approve_permit2", "place_exact_proxy",
    "place_upto_contracts",
]

UPTO_PROXY_ADDRESS = X402_UPTO_PERMIT2_PROXY_ADDRESS
EXACT_PROXY_ADDRESS = X402_EXACT_PERMIT2_PROXY_ADDRESS
MAX_UINT256 = 2**256 - 1
# TestUSDC's storage: name, symbol, version, totalSupply, _balances, then _allowances (slot 5).
_ALLOWANCES_SLOT = 5
_ALLOWANCE_ABI = [{
    "type": "function", "name": "allowance", "stateMutability": "view",
    "inputs": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"}],
    "outputs": [{"name": "", "type": "uint256"}],
}]


def place_upto_contracts(w3: Web3, load_artifact: Any) -> tuple[str, str]:
    """Permit2 and the upto proxy at their canonical addresses; returns (permit2, proxy)."""
    for contract, address in (("Permit2", PERMIT2_ADDRESS), ("X402UptoPermit2Proxy", UPTO_PROXY_ADDRESS)):
        _place(w3, load_artifact, contract, address)
    return Web3.to_checksum_address(PERMIT2_ADDRESS), Web3.to_checksum_address(UPTO_PROXY_ADDRESS)


def place_exact_proxy(w3: Web3, load_artifact: Any) -> str:
    """The x402 exact Permit2 proxy (``exact`` for ERC-20 tokens without EIP-3009) at its canonical
    address; Permit2 must be there already (``place_upto_contracts``). Returns the address."""
    _place(w3, load_artifact, "X402ExactPermit2Proxy", EXACT_PROXY_ADDRESS)
    return Web3.to_checksum_address(EXACT_PROXY_ADDRESS)


def _place(w3: Web3, load_artifact: Any, contract: str, address: str) -> None:
    creation = load_artifact(contract)["bytecode"]
    try:
        runtime = w3.eth.call({"data": creation})
        _rpc(w3, "anvil_setCode", [address, "0x" + bytes(runtime).hex()])
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"could not place {contract} on the dev chain: {exc}", code="transaction_failed") from exc
    if not runtime:
        raise DevchainError(f"{contract}'s creation code returned no runtime code", code="transaction_failed")


def approve_permit2(
    w3: Web3, token: str, owners: Iterable[str], amount: int = MAX_UINT256, *, allowances_slot: int = _ALLOWANCES_SLOT
) -> None:
    """Each owner's allowance of Permit2 on ``token`` set to ``amount`` (storage, no transaction),
    confirmed by reading ``allowance`` back (a token of another layout is an error, not a guess)."""
    contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=_ALLOWANCE_ABI)
    for owner in owners:
        slot = allowance_slot(owner, PERMIT2_ADDRESS, allowances_slot)
        try:
            _rpc(w3, "anvil_setStorageAt", [token, "0x" + slot.hex(), "0x" + amount.to_bytes(32, "big").hex()])
            seen = int(contract.functions.allowance(Web3.to_checksum_address(owner), PERMIT2_ADDRESS).call())
        except (OSError, Web3Exception) as exc:
            raise DevchainError(f"could not approve Permit2 for {owner}: {exc}", code="transaction_failed") from exc
        if seen != amount:
            raise DevchainError(f"token {token} does not keep allowances at mapping slot {allowances_slot}", code="transaction_failed")


def allowance_slot(owner: str, spender: str, mapping_slot: int = _ALLOWANCES_SLOT) -> bytes:
    """keccak(spender ‖ keccak(owner ‖ slot)): Solidity's slot of ``_allowances[owner][spender]``."""
    inner = keccak(abi_encode(["address", "uint256"], [owner, mapping_slot]))
    return keccak(abi_encode(["address", "bytes32"], [spender, inner]))


def _rpc(w3: Web3, method: str, params: list[Any]) -> None:
    answer = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if answer.get("error"):
        raise DevchainError(f"{method} refused: {answer['error']}", code="transaction_failed")
