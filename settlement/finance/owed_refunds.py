"""Refunds still owed, what the chain says of each, and paying them (``x402gw ledger refunds``).

A refund is owed when a settled payment bought nothing (an ``upfront`` tool whose upstream failed,
an answer lost after settlement). The request that owed it pays it when a refund key is configured;
without one, or when its broadcast failed or its receipt never came, the refund stays owed. Each
owed refund is classified against the chain by the transaction recorded for it, if any:

- ``unpaid``: no refund transaction was ever claimed for it;
- ``landed``: its transaction is mined and moved the amount to the payer: only the record was
  missing (the process died before writing it); recorded paid, nothing is sent;
- ``reverted``: its transaction is mined and failed: nothing moved; paid again;
- ``pending``: the node has it, not mined yet: left alone (it may still land);
- ``unknown``: the node does not know it: it may never have been sent (a refused broadcast), or may
  still land from another node's pool; paid again only with ``include_unknown`` (the operator has
  checked it cannot land: the refund account's nonce moved past it, say), and only once its claim is
  older than ``quiet_seconds``: a claim is written before its broadcast, so a refund the gateway is
  sending right now (or sending again after a lost answer) reads ``unknown`` too (``too_recent``);
- ``unexplained``: mined and successful, without the transfer to the payer: left for a person.

Before anything is paid, the row's own settlement is read on chain: a refund goes only to the
account its transaction moved the payment from, and never exceeds what it moved (an EIP-3009
payment: its very authorization used there). A row that does not match (an insider's edit of the
payer, the amount owed, the transaction) is ``charge_unexplained``: nothing sent, left for a person.
And a refund is paid only when the audit trail names it: the pipeline records each refund it owes
(``refund_owed``: payment id, amount), so a ``refund_owed`` written into a delivered payment's row
by SQL (whose settlement on chain is real) is ``refund_unaudited``, reported and never paid. Each
refund paid is recorded there too (``refund_paid``), so one reopened by SQL is
``refund_already_paid``; and a refund named under a request whose own ``response`` record says its
answer was delivered is ``refund_contradicted`` (``settlement.audit.refund_check``).

Paying is exactly-once against every other payer of the same refund (a request of the gateway,
another run of this command): each claims the refund in the ledger before its broadcast
(``Ledger.record_refund_tx``, only while the refund transaction is still the one it read), so two
never both broadcast; the hash is recorded before the transaction leaves. A payer whose broadcast
was refused for a stale nonce signs again: its new hash replaces its own claim (the refused one can
never land), as its claim and not another payer's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol

from settlement.chain.broadcast import BeforeSend
from settlement.chain.receipts import Receipt
from settlement.chain.refunds import RefundResult
from settlement.errors import ChainUnavailable
from settlement.ledger import Ledger, Payment
from settlement.ledger.models import utcnow
from settlement.schemes.exact_permit2_payload import moved_by_permit2
from settlement.schemes.exact_resolve import settled_by

__all__ = ["LANDED", "PENDING", "REVERTED", "UNEXPLAINED", "UNKNOWN", "UNKNOWN_QUIET_SECONDS", "UNPAID", "RefundLine",
           "RefundTrail", "RefundsReport", "settle_owed_refunds"]

UNPAID, LANDED, REVERTED, PENDING, UNKNOWN, UNEXPLAINED = "unpaid", "landed", "reverted", "pending", "unknown", "unexplained"
_PAYABLE = {UNPAID, REVERTED}
# An ``unknown`` refund whose claim is younger than this may be in flight still: a gateway broadcasts
# right after its claim, and sends a transaction whose answer was lost again for about two minutes.
UNKNOWN_QUIET_SECONDS = 600.0


class RefundChain(Protocol):
    async def get_receipt(self, tx_hash: str) -> Receipt | None: ...

    async def knows_transaction(self, tx_hash: str) -> bool: ...


class RefundTrail(Protocol):
    """The audit trail's say on refunds (``gateway.cli.refunds``): why a row's refund must not be paid
    (``settlement.audit.refund_refusal``), and the record of one paid, written before the ledger's."""

    def refusal(self, row: Payment) -> str | None: ...

    def paid(self, row: Payment, amount: int, tx_hash: str | None) -> None: ...


class RefundPayer(Protocol):
    def can_refund(self, network: str) -> bool: ...

    async def refund(self, network: str, token: str, to: str, amount: int,
                     before_send: BeforeSend | None = None) -> RefundResult: ...


@dataclass(slots=True)
class RefundLine:
    payment_id: int
    network: str
    payer: str
    amount: int
    reason: str | None
    status: str  # what the chain said of the refund before this run (above)
    tx_hash: str | None  # its refund transaction: the one found, or the one this run sent
    outcome: str  # what this run did: listed, paid, recorded, sent, left, too_recent, claimed_elsewhere, no_refund_key, failed
    decimals: int = 6  # of the token

    @property
    def settled(self) -> bool:
        """Nothing is owed any more after this run."""
        return self.outcome in ("paid", "recorded", "recorded_elsewhere")

    def to_json(self) -> dict[str, Any]:
        return {"payment": self.payment_id, "network": self.network, "payer": self.payer, "amount": str(self.amount),
                "reason": self.reason, "status": self.status, "refundTransaction": self.tx_hash, "outcome": self.outcome}


@dataclass(slots=True)
class RefundsReport:
    lines: list[RefundLine] = field(default_factory=list)
    unchecked_networks: list[str] = field(default_factory=list)  # owed refunds on networks without chain access

    @property
    def still_owed(self) -> list[RefundLine]:
        return [line for line in self.lines if not line.settled]

    def to_json(self) -> dict[str, Any]:
        owed = self.still_owed
        return {"refunds": [line.to_json() for line in self.lines], "stillOwed": len(owed),
                "stillOwedAmount": str(sum(line.amount for line in owed)), "uncheckedNetworks": self.unchecked_networks}


class _ClaimedElsewhere(Exception):
    """Another payer claimed this refund between our read and our broadcast."""


async def refund_status(chain: RefundChain, row: Payment) -> str:
    """What the chain says of ``row``'s refund transaction (the module's list)."""
    if not row.refund_tx:
        return UNPAID
    receipt = await chain.get_receipt(row.refund_tx)
    if receipt is None:
        return PENDING if await chain.knows_transaction(row.refund_tx) else UNKNOWN
    if receipt.status != 1:
        return REVERTED
    # The refund account is the transaction's sender (whichever key it was then).
    if receipt.sender and receipt.has_transfer(row.asset, receipt.sender, row.payer, int(row.refund_owed or 0)):
        return LANDED
    return UNEXPLAINED


async def settle_owed_refunds(
    ledger: Ledger, chains: Mapping[str, RefundChain], refunder: RefundPayer | None, *, pay: bool,
    include_unknown: bool = False, on_line: Callable[[RefundLine], None] = lambda line: None,
    quiet_seconds: float = UNKNOWN_QUIET_SECONDS, trail: RefundTrail | None = None,
) -> RefundsReport:
    """Every owed refund, oldest first, classified; with ``pay``, each paid or recorded as it can be.
    ``trail``: a refund it refuses (``refund_unaudited``, ``refund_already_paid``,
    ``refund_contradicted``) is never paid, left for a person; each one paid or recorded is
    recorded there (``refund_paid``) before the ledger records it."""
    report = RefundsReport()
    for row in await ledger.run(ledger.owed_refunds):
        chain = chains.get(row.network)
        if chain is None:
            if row.network not in report.unchecked_networks:
                report.unchecked_networks.append(row.network)
            continue
        status = await refund_status(chain, row)
        line = RefundLine(row.id, row.network, row.payer, int(row.refund_owed or 0), row.refund_reason, status,
                          row.refund_tx, "listed", row.decimals)
        refused = await asyncio.to_thread(trail.refusal, row) if pay and trail is not None and line.status != LANDED else None
        if refused is not None:
            line.outcome = refused  # never owed, already paid, or its answer delivered: left for a person
        elif pay:
            await _settle(ledger, refunder, row, line, include_unknown, quiet_seconds, chain, trail)
        report.lines.append(line)
        on_line(line)
    return report


def _claimed_seconds_ago(row: Payment) -> float:
    """How long ago the row was last written (its refund claim, or a later write); a naive time
    (SQLite) is UTC, as the ledger writes it."""
    moment = row.updated_at if row.updated_at.tzinfo is not None else row.updated_at.replace(tzinfo=UTC)
    return (utcnow() - moment).total_seconds()


async def charge_shown(chain: RefundChain, row: Payment, amount: int) -> bool:
    """Whether the row's settlement transaction, on chain, moved at least ``amount`` of its asset from
    its payer to its payee: its transfer of the row's amount, and (EIP-3009) its authorization used
    there (``exact_resolve.settled_by``, what the resolver and reconcile ask too)."""
    if not row.tx_hash or amount > row.amount:
        return False
    receipt = await chain.get_receipt(row.tx_hash)
    if receipt is None:
        return False
    if moved_by_permit2(row):  # upto, or exact through Permit2: no AuthorizationUsed, its transfer is the proof
        return receipt.status == 1 and receipt.has_transfer(row.asset, row.payer, row.pay_to, row.amount)
    try:
        return settled_by(receipt, row)
    except ValueError:  # a nonce that is not hex (an edited row)
        return False


async def _settle(ledger: Ledger, refunder: RefundPayer | None, row: Payment, line: RefundLine,
                  include_unknown: bool, quiet_seconds: float, chain: RefundChain, trail: RefundTrail | None = None) -> None:
    if line.status == LANDED:
        if trail is not None:
            await asyncio.to_thread(trail.paid, row, line.amount, row.refund_tx)
        first = await ledger.run(ledger.record_refund_paid, row.id, row.refund_tx)
        line.outcome = "recorded" if first else "recorded_elsewhere"
        return
    if line.status not in _PAYABLE and not (include_unknown and line.status == UNKNOWN):
        line.outcome = "left"
        return
    if line.status == UNKNOWN and _claimed_seconds_ago(row) < quiet_seconds:
        line.outcome = "too_recent"  # its broadcast may be on its way: paying now could pay twice
        return
    if refunder is None or not refunder.can_refund(row.network):
        line.outcome = "no_refund_key"
        return
    if not await charge_shown(chain, row, line.amount):
        line.outcome = "charge_unexplained"  # the chain does not show this payer paying this much here
        return
    previous = row.refund_tx
    claimed: list[str] = []

    async def claim(tx_hash: str) -> None:
        # A second signature (the first refused for a stale nonce) replaces this run's own claim.
        if not await ledger.run(ledger.record_refund_tx, row.id, tx_hash, claimed[-1] if claimed else previous):
            raise _ClaimedElsewhere
        claimed.append(tx_hash)

    try:
        result = await refunder.refund(row.network, row.asset, row.payer, line.amount, claim)
    except _ClaimedElsewhere:
        line.outcome = "claimed_elsewhere"
        return
    except ChainUnavailable as exc:
        line.outcome = f"failed: {exc.code}"
        return
    if result.refused and claimed:  # it never left: the refund reads as before this run
        await ledger.run(ledger.record_refund_tx, row.id, previous, claimed[-1])
        claimed.clear()
    line.tx_hash = result.tx_hash or (claimed[-1] if claimed else previous)
    if result.confirmed:
        if trail is not None:  # the trail first: a ledger write lost after it leaves the row named, never paid twice
            await asyncio.to_thread(trail.paid, row, line.amount, result.tx_hash)
        await ledger.run(ledger.record_refund_paid, row.id, result.tx_hash)
        line.outcome = "paid"
    else:
        line.outcome = "sent" if result.tx_hash and result.reason == "refund_pending" else f"failed: {result.reason}"
