"""Which BatchSettler a gateway process settles through: the one whose ``settler`` is its account.

``contracts/BatchSettler.sol`` takes ``settle`` from one account only (its immutable ``settler``).
A process given several contracts (``serve --workers``: one per worker's settlement account) takes
the one that names its own account; a process given one checks that it does. Both read
``settler()`` on chain at start-up, so a wrong address is refused before the first payment rather
than reverting every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from eth_typing import ChecksumAddress
from eth_utils import to_checksum_address

from settlement.chain.client import selector
from settlement.chain.rpc import RpcError
from settlement.errors import SettlementError

__all__ = ["SEL_SETTLER", "SettlerReader", "choose_settler", "settler_in", "settler_of"]

SEL_SETTLER = selector("settler()")


class SettlerReader(Protocol):
    @property
    def settlement_address(self) -> str | None: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...


async def settler_of(chain: SettlerReader, contract: str) -> ChecksumAddress:
    """The account ``contract`` takes ``settle`` from; ``SettlementError`` when it is no BatchSettler."""
    try:
        answer = await chain.eth_call(contract, SEL_SETTLER)
    except RpcError as exc:  # the node answered: a revert, no settler() here (unreachable: raised as is)
        raise SettlementError(f"{contract} is not a BatchSettler (settler() failed: {exc.message})",
                              code="batch_settler_invalid") from None
    settler = settler_in(answer)
    if settler is None:
        raise SettlementError(f"{contract} is not a BatchSettler (settler() gave no address)", code="batch_settler_invalid")
    return settler


def settler_in(answer: bytes) -> ChecksumAddress | None:
    """The address a ``settler()`` call answered; None for an answer that is no address."""
    return to_checksum_address(answer[12:]) if len(answer) == 32 and answer[:12] == bytes(12) else None


async def choose_settler(network: str, chain: SettlerReader, candidates: Sequence[str]) -> ChecksumAddress:
    """The one of ``candidates`` whose settler is ``chain``'s settlement account."""
    account = chain.settlement_address
    if account is None:
        raise SettlementError(f"batched settlement on {network} needs a settlement key", code="settlement_key_missing")
    named: list[str] = []
    for contract in candidates:
        settler = await settler_of(chain, contract)
        if settler.lower() == account.lower():
            return to_checksum_address(contract)
        named.append(f"{to_checksum_address(contract)} takes {settler}")
    raise SettlementError(
        f"no BatchSettler on {network} takes settlements from this process's account {to_checksum_address(account)} "
        f"({'; '.join(named)}): deploy contracts/BatchSettler.sol with it as the settler and list it in "
        "X402GW_BATCH_SETTLEMENT's \"contracts\"",
        code="batch_settler_not_ours",
    )
