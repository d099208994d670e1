"""The payment ledger: one row per payment, its named state transitions, and group commit.

Knows nothing of migrations or of the audit trail (both sit above it): a ``Ledger`` opens a
database whose schema is already current. At start-up use ``settlement.schema.open_ledger``.
``settlement.ledger.resolve`` (settling an unknown outcome against the chain) is imported by name.
"""

from settlement.ledger.models import (
    OPEN_STATES,
    AtomicAmount,
    Base,
    Payment,
    PaymentState,
    StoredResponse,
    create_ledger_engine,
    utcnow,
)
from settlement.ledger.outbox import EVENTS, OutboxRow, Subscriptions
from settlement.ledger.payments import Ledger, settled_copy
from settlement.ledger.transitions import TRANSITIONS

__all__ = [
    "EVENTS",
    "OPEN_STATES",
    "TRANSITIONS",
    "AtomicAmount",
    "Base",
    "Ledger",
    "OutboxRow",
    "Payment",
    "PaymentState",
    "StoredResponse",
    "Subscriptions",
    "create_ledger_engine",
    "settled_copy",
    "utcnow",
]
