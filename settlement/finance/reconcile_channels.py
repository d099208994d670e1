"""Reconcile for ``batch-settlement``: each claim transaction tied to the calls it settled.

A call paid through a channel is a ledger row whose transaction is the claim that covered it
(``settlement.schemes.channels_claims``); on chain, that claim's ``settle`` is one ``Transfer`` of
the token from the escrow to each payee, the sum of what the claim claimed for it. So the rows are
grouped by (claim transaction, payee) and each group's sum is compared with its transfer: equal,
every row is matched; different, every row of the group is an amount mismatch; no transfer, every
row is missing on chain. Each claim is reported with its channels, calls and amount
(``channel_claims``), and its transfer counts as a payment, not a plain transfer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from settlement.ledger import Payment
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_contract import ESCROW_ADDRESS

__all__ = ["ClaimMatch", "is_channel_row", "match_channel_claims"]


class Transfer(Protocol):
    @property
    def tx_hash(self) -> str: ...

    @property
    def payer(self) -> str: ...

    @property
    def pay_to(self) -> str: ...

    @property
    def amount(self) -> int: ...


def is_channel_row(row: Payment) -> bool:
    return '"channelConfig"' in row.authorization and row_payment(row) is not None


@dataclass(slots=True)
class ClaimMatch:
    matched: int = 0
    consumed: int = 0  # transfers that were claims (payments, not plain transfers)
    missing_on_chain: list[dict[str, Any]] = field(default_factory=list)
    amount_mismatch: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)


def match_channel_claims(rows: Iterable[Payment], plain: Iterable[Transfer],
                         row_json: Callable[[Payment], dict[str, Any]]) -> ClaimMatch:
    """Settled channel ``rows`` against the escrow's transfers to their payees (``plain``: transfers
    without an EIP-3009 authorization)."""
    escrow = ESCROW_ADDRESS.lower()
    by_tx = {(t.tx_hash.lower(), t.pay_to.lower()): t for t in plain if t.payer.lower() == escrow}
    groups: dict[tuple[str, str], list[Payment]] = defaultdict(list)
    for row in rows:
        groups[((row.tx_hash or "").lower(), row.pay_to.lower())].append(row)
    match = ClaimMatch()
    for (tx_hash, pay_to), group in sorted(groups.items()):
        total = sum(r.amount for r in group)
        channels = sorted({p.channel_id for p in (row_payment(r) for r in group) if p is not None})
        claim: dict[str, Any] = {"tx_hash": tx_hash, "pay_to": pay_to, "channels": channels,
                                 "calls": [r.id for r in group], "amount_atomic": str(total)}
        t = by_tx.get((tx_hash, pay_to))
        if t is None:
            match.missing_on_chain.extend(row_json(r) for r in group)
            claim["chain_amount_atomic"] = None
        else:
            match.consumed += 1
            claim["chain_amount_atomic"] = str(t.amount)
            if t.amount == total:
                match.matched += len(group)
            else:
                match.amount_mismatch.extend({**row_json(r), "claim_amount_atomic": str(t.amount)} for r in group)
        match.claims.append(claim)
    return match
