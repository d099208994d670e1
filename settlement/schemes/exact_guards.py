"""The exact scheme's guards of the settlement account's gas: what a payer could otherwise make it spend
on transactions that revert, for nothing.

- ``transfer_refusal``: an account with code (a contract, or an EOA with an EIP-7702 delegation) that
  signed with its ECDSA key. The token (FiatToken v2.2's ``SignatureChecker``) asks that code whether
  the signature holds, and the code may refuse or burn every unit of gas it is given: the payer signs
  for free, verify (offline recovery, nonce, balance) says yes, and each settlement reverts on the
  gateway's gas. Verify simulates the transfer (one gas-capped ``eth_call``) for such a payer first.
- ``InFlight``: what each payer's settlements in flight take from its balance, in this process. One
  balance signed over many times at once (fresh nonces, no transaction of the payer's) passes as many
  verifies against the same balance, and every settlement but the first would revert. A settlement is
  refused, nothing broadcast, when the payer's other settlements in flight already take what its
  balance holds; verify refuses it too when it can already tell.

What is left: ``InFlight`` is per process (workers and replicas each count their own, so a burst
spread over N processes can still cost up to N-1 reverts), and a delegation made between verify and
settlement costs the payer a transaction of its own for each revert it causes. A payer's settlement
mined but whose receipt this process has not read yet still counts as in flight: a payer whose
balance is exactly spent by its concurrent payments may be refused one it could pay (402, retryable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from settlement.chain.authorization import Eip3009Authorization, split_signature
from settlement.chain.broadcast import TRANSFER_GAS_LIMIT
from settlement.chain.client import transfer_with_authorization_calldata
from settlement.chain.rpc import RpcError
from settlement.errors import ChainUnavailable

__all__ = ["INSUFFICIENT_BALANCE", "InFlight", "revert_reason_code", "transfer_refusal"]

INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
_SIGNATURE = "invalid_exact_evm_payload_signature"
# What a token's revert message says, as the x402 reason code (a refused broadcast, a batch item, a simulation).
REVERT_CODES = (
    ("authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("authorization is used", "invalid_exact_evm_nonce_already_used"),
    ("transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
    ("invalid signature", "invalid_exact_evm_payload_signature"),
)


def revert_reason_code(message: str) -> str:
    lowered = message.lower()
    for needle, code in REVERT_CODES:
        if needle in lowered:
            return code
    return "transaction_failed"


class CodeReader(Protocol):
    async def get_code(self, address: str) -> bytes: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...


class BalanceReader(Protocol):
    async def balance_of(self, token: str, owner: str) -> int: ...


async def transfer_refusal(
    chain: CodeReader, code: bytes, token: str, auth: Eip3009Authorization, signature: bytes,
) -> str | None:
    """For a payer whose account has ``code``: the reason its transfer would fail (its code refused the
    signature or ran out of the settlement's gas), or None when the simulation succeeds. An account
    without code: None, no call (the token checks the ECDSA signature itself, as verify did)."""
    if not code:
        return None
    v, r, s = split_signature(signature)
    try:
        await chain.eth_call(token, transfer_with_authorization_calldata(auth, v, r, s), gas=TRANSFER_GAS_LIMIT)
    except RpcError as exc:
        reason = revert_reason_code(exc.rpc_message or "")
        # Nonce, balance and window were checked already: what is left to fail is the code's signature check.
        return _SIGNATURE if reason == "transaction_failed" else reason
    return None


class InFlight:
    """Per (network, token, payer): the sum of the values of its settlements in flight in this process."""

    def __init__(self) -> None:
        self._taken: dict[tuple[str, str, str], int] = {}

    def taken(self, network: str, token: str, payer: str) -> int:
        return self._taken.get((network, token.lower(), payer.lower()), 0)

    @asynccontextmanager
    async def hold(self, chain: BalanceReader, network: str, token: str, payer: str, value: int) -> AsyncIterator[bool]:
        """Holds ``value`` of the payer's balance while the block runs (its settlement is sent and
        awaited there) and yields whether the balance covers it beside what the payer's other
        settlements in flight take: read on chain only when there are any (verify read it otherwise);
        a read that fails lets it through, as before this guard."""
        key = (network, token.lower(), payer.lower())
        others = self._taken.get(key, 0)
        self._taken[key] = others + value  # before any await: a concurrent settlement counts this one
        try:
            covered = True
            if others:
                try:
                    covered = await chain.balance_of(token, payer) >= others + value
                except ChainUnavailable:
                    covered = True
            yield covered
        finally:
            left = self._taken[key] - value
            if left > 0:
                self._taken[key] = left
            else:
                del self._taken[key]
