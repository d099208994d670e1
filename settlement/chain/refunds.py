"""Refunds for ``upfront`` tools: the payment settled, then the upstream failed.

The ledger always records the refund owed; when a refund signer is configured for the network
(an account holding the payee's funds), the amount is also paid back on chain with a plain
ERC-20 ``transfer`` and the transaction recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from settlement.chain.client import BeforeSend, JsonRpcChain
from settlement.chain.rpc import RpcError
from settlement.errors import ChainUnavailable


@dataclass(frozen=True, slots=True)
class RefundResult:
    tx_hash: str | None
    confirmed: bool
    reason: str | None = None
    refused: bool = False  # the node refused the broadcast: it never left (its claim may be released)


class Refunder:
    def __init__(self, chains: dict[str, JsonRpcChain], *, receipt_timeout: float = 30.0) -> None:
        self._chains = chains
        self._receipt_timeout = receipt_timeout

    def can_refund(self, network: str) -> bool:
        return network in self._chains

    async def refund(
        self, network: str, token: str, to: str, amount: int, before_send: BeforeSend | None = None
    ) -> RefundResult:
        chain = self._chains.get(network)
        if chain is None:
            return RefundResult(None, False, "no_refund_signer")
        try:
            tx_hash = await chain.send_transfer(token, to, amount, before_send)
            receipt = await chain.wait_for_receipt(tx_hash, self._receipt_timeout)
        except RpcError as exc:
            # Refused, and the node asked says it does not have it: it never left. With several
            # RPC URLs another node may hold it (an answer lost, then a refusal from the next one):
            # not known to be refused, so its claim stays.
            return RefundResult(None, False, exc.code, refused=len(chain.rpc_urls) == 1)
        except ChainUnavailable as exc:
            return RefundResult(getattr(exc, "tx_hash", None), False, exc.code)
        if receipt is None:
            return RefundResult(tx_hash, False, "refund_pending")
        if receipt.status != 1 or not receipt.has_transfer(token, chain.settlement_address or "", to, amount):
            return RefundResult(tx_hash, False, "refund_failed")
        return RefundResult(tx_hash, True)

    async def close(self) -> None:
        for chain in self._chains.values():
            await chain.close()
