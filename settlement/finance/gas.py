"""Backfill of gas: rows whose settlement transaction was mined but whose gas is not recorded (settled
before the gas columns existed, resolved by a reconcile, or settled by a remote facilitator, which
does not report gas) get it from the transaction's receipt (``eth_getTransactionReceipt``).

Only gas the settlement key paid counts: with ``senders`` (network → the settlement key's address),
a receipt sent by another account (a remote facilitator's) is reported, and its rows get the
transaction's gasUsed and effectiveGasPrice with a cost of 0 (not ours; no longer missing).

A transaction shared by several rows (a batch) is split among every row that names it, in ledger
id order, with ``settlement.chain.gas.split_gas``: rows that already have their share keep it, and
the missing ones get theirs of the same split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy import select

from settlement.chain.gas import receipt_shares
from settlement.chain.receipts import Receipt
from settlement.ledger import Ledger, Payment, PaymentState

__all__ = ["BackfillReport", "ReceiptReader", "backfill_gas"]

_MINED = (PaymentState.SETTLED.value, PaymentState.FAILED.value)


class ReceiptReader(Protocol):
    async def get_receipt(self, tx_hash: str) -> Receipt | None: ...


@dataclass(slots=True)
class BackfillReport:
    filled: int = 0  # rows that got their gas (not counting other_sender's, recorded at 0 wei)
    transactions: int = 0  # receipts read
    no_receipt: list[str] = field(default_factory=list)  # hashes the chain does not know (never mined)
    no_gas: list[str] = field(default_factory=list)  # receipts without gasUsed/effectiveGasPrice
    other_sender: list[str] = field(default_factory=list)  # sent (and paid for) by another account
    unchecked_networks: list[str] = field(default_factory=list)  # rows on networks without chain access

    def to_json(self) -> dict[str, Any]:
        return {"filled": self.filled, "transactions": self.transactions, "noReceipt": self.no_receipt,
                "noGas": self.no_gas, "otherSender": self.other_sender, "uncheckedNetworks": self.unchecked_networks}


def _missing(ledger: Ledger) -> dict[tuple[str, str], list[tuple[int, bool]]]:
    """(network, tx hash) → every row naming it, as (id, has gas), for transactions with a row missing gas."""
    with ledger.engine.connect() as conn:
        wanted = select(Payment.tx_hash).where(
            Payment.tx_hash.is_not(None), Payment.gas_cost.is_(None), Payment.state.in_(_MINED)
        )
        rows = conn.execute(
            select(Payment.network, Payment.tx_hash, Payment.id, Payment.gas_cost)
            .where(Payment.tx_hash.in_(wanted.scalar_subquery()), Payment.state.in_(_MINED))
            .order_by(Payment.id)
        ).all()
    found: dict[tuple[str, str], list[tuple[int, bool]]] = defaultdict(list)
    for network, tx_hash, pid, gas_cost in rows:
        assert tx_hash is not None  # selected by it
        found[(network, tx_hash)].append((pid, gas_cost is not None))
    return found


async def backfill_gas(
    ledger: Ledger, chains: Mapping[str, ReceiptReader], senders: Mapping[str, str] | None = None,
) -> BackfillReport:
    """Record the gas of every mined row missing it. A node that stops answering raises
    ``ChainUnavailable``; the rows written until then stay written (each row's gas is one transition)."""
    report = BackfillReport()
    unchecked: set[str] = set()
    for (network, tx_hash), rows in (await ledger.run(_missing, ledger)).items():
        chain = chains.get(network)
        if chain is None:
            unchecked.add(network)
            continue
        receipt = await chain.get_receipt(tx_hash)
        report.transactions += 1
        if receipt is None:
            report.no_receipt.append(tx_hash)
            continue
        shares = receipt_shares(receipt, len(rows))
        if shares is None:
            report.no_gas.append(tx_hash)
            continue
        ours = (senders or {}).get(network)
        if ours is not None and (receipt.sender or "").lower() != ours.lower():
            # Sent (and paid for) by another account: the settlement key paid nothing for these rows.
            report.other_sender.append(tx_hash)
            shares = [replace(share, gas_cost=0) for share in shares]
        for (pid, has_gas), share in zip(rows, shares, strict=True):
            if not has_gas:
                await ledger.run(ledger.record_gas, pid, share.ledger_fields())
                if not report.other_sender or report.other_sender[-1] != tx_hash:
                    report.filled += 1
    report.unchecked_networks = sorted(unchecked)
    return report
