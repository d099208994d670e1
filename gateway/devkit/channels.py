"""The x402 ``batch-settlement`` escrow and its ERC-3009 deposit collector on the dev chain, at the
addresses the x402 SDK hard-codes (``batch_settlement.constants``).

Both contracts (``contracts/X402BatchSettlement.sol``) work from their runtime code alone: no
constructor state and no immutables (the escrow computes its EIP-712 domain from ``address(this)``
per call; the collector names the escrow as a constant). So placing them is an ``eth_call`` of the
creation code (which returns the runtime code, sending nothing) and ``anvil_setCode``: no
transaction, so every other address and block of the dev chain stays where it was.
"""

from __future__ import annotations

from typing import Any

from web3 import Web3
from web3.exceptions import Web3Exception
from x402.mechanisms.evm.batch_settlement.constants import BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS

from settlement.chain.deployment import DevchainError

__all__ = ["COLLECTOR_ADDRESS", "ESCROW_ADDRESS", "place_channel_contracts"]

ESCROW_ADDRESS = Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS)
COLLECTOR_ADDRESS = Web3.to_checksum_address(ERC3009_DEPOSIT_COLLECTOR_ADDRESS)


def place_channel_contracts(w3: Web3, load_artifact: Any) -> str:
    """The escrow and the ERC-3009 deposit collector at their canonical addresses; returns the escrow's."""
    for contract, address in (("X402BatchSettlement", ESCROW_ADDRESS), ("ERC3009DepositCollector", COLLECTOR_ADDRESS)):
        creation = load_artifact(contract)["bytecode"]
        try:
            runtime = bytes(w3.eth.call({"data": creation}))
            answer = w3.provider.make_request("anvil_setCode", [address, "0x" + runtime.hex()])  # type: ignore[arg-type]
        except (OSError, Web3Exception) as exc:
            raise DevchainError(f"could not place {contract} on the dev chain: {exc}", code="transaction_failed") from exc
        if not runtime or answer.get("error"):
            raise DevchainError(f"could not place {contract} on the dev chain", code="transaction_failed")
    return ESCROW_ADDRESS
