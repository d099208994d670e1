"""A payment's refund, as named transitions of its settled row (``Ledger`` inherits them), and the
refunds still owed.

A refund is owed once (``record_refund_owed``), claimed by one payer at a time before any broadcast
(``record_refund_tx``: the request that owed it, or ``x402gw ledger refunds --pay`` later) and
recorded paid once (``record_refund_paid``). Each is one guarded UPDATE (``settlement.ledger.payments``):
a claim holds only while the row's refund transaction is still the one the claimant read, so two
payers racing for one refund never both broadcast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from settlement.errors import LedgerError
from settlement.ledger.group_commit import atomic_alone
from settlement.ledger.models import Payment, PaymentState, StoredResponse, utcnow
from settlement.ledger.transitions import FROM_SETTLED

__all__ = ["GUARD_CODES", "RefundTransitions"]

# The code a guarded transition raises when its guard (not the row's state) refuses it.
GUARD_CODES = {"begin_settlement": "invalid_transition", "record_refund_owed": "refund_already_owed",
               "record_refund_tx": "refund_claimed", "record_refund_paid": "refund_already_paid",
               "record_upstream_status": "refund_already_owed", "record_answer_lost": "answer_claimed"}


class RefundTransitions:
    def _move(self, name: str, payment_id: int, allowed: tuple[str, ...], values: dict[str, Any],
              guard: dict[str, Any] | None = None) -> None:
        raise NotImplementedError  # ``Ledger``'s

    def _session(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # ``Ledger``'s

    @atomic_alone
    def record_refund_owed(self, payment_id: int, amount: int, reason: str | None) -> bool:
        """Once per payment: False when a refund is already owed (another request owes and pays it: never twice)."""
        return self._guarded("record_refund_owed", payment_id, {"refund_owed": amount, "refund_reason": reason}, {})

    @atomic_alone
    def record_upstream_status(self, payment_id: int, status: int) -> bool:
        """The upstream's status after an upfront settlement (``settled``; no state change): the claim
        of its answer, before any of it is given. False: the refund of an answer lost is owed already
        (the lost-answer sweep, a resend): the answer is not given."""
        return self._guarded("record_upstream_status", payment_id, {"upstream_status": status}, {})

    @atomic_alone
    def record_answer_lost(self, payment_id: int, amount: int) -> bool:
        """The refund of an answer never given, owed once and only while no answer is claimed
        (``record_upstream_status``): in one guarded UPDATE each, so a request that got its answer and
        a sweep (or resend) that found none never both win, whatever the payment lock said."""
        return self._guarded("record_answer_lost", payment_id, {"refund_owed": amount, "refund_reason": "answer_lost"}, {})

    @atomic_alone
    def record_refund_tx(self, payment_id: int, tx_hash: str | None, previous: str | None = None) -> bool:
        """The refund transaction's hash, before it is broadcast: a claim, taken only while the row's
        refund transaction is still ``previous`` (None: none yet) and the refund unpaid. False: another
        payer of the refund (a request, ``ledger refunds --pay``) claimed it first: do not broadcast.
        A claim whose broadcast the node refused (it never left) is released by its claimant the same
        way: from its own hash back to what it replaced."""
        return self._guarded("record_refund_tx", payment_id, {"refund_tx": tx_hash}, {"previous_refund_tx": previous or ""})

    @atomic_alone
    def record_refund_paid(self, payment_id: int, tx_hash: str | None) -> bool:
        """The refund reached the payer under ``tx_hash``: once (False: it was recorded paid already)."""
        return self._guarded("record_refund_paid", payment_id, {"refund_tx": tx_hash, "refunded_at": utcnow()}, {})

    def _guarded(self, name: str, payment_id: int, values: dict[str, Any], guard: dict[str, Any]) -> bool:
        try:
            self._move(name, payment_id, FROM_SETTLED, values, guard)
        except LedgerError as exc:
            if exc.code != GUARD_CODES[name]:
                raise
            return False
        return True

    def answers_lost(self, since: datetime | None = None) -> list[Payment]:
        """Settled ``upfront`` payments with no answer stored, no upstream status and no refund: the
        request died between its settlement and its answer (or is still running: its lock says).
        ``since``: only those created since then (an index range, not the whole ledger)."""
        stored = select(StoredResponse.payment_id).where(StoredResponse.payment_id == Payment.id).exists()
        query = select(Payment).where(
            Payment.state == PaymentState.SETTLED.value, Payment.settle_mode == "upfront", Payment.refund_owed.is_(None),
            Payment.upstream_status.is_(None), ~stored,
            *(() if since is None else (Payment.created_at >= since,)),
        ).order_by(Payment.id)
        with self._session() as session:
            return list(session.scalars(query))

    def owed_refunds(self) -> list[Payment]:
        """Settled payments owing a refund not yet paid, oldest first."""
        query = select(Payment).where(
            Payment.state == PaymentState.SETTLED.value, Payment.refund_owed.is_not(None), Payment.refunded_at.is_(None),
        ).order_by(Payment.id)
        with self._session() as session:
            return list(session.scalars(query))
