"""Test set-up only: write a payment row's columns directly, past the ledger's transitions.

The ledger moves a row only through its named transitions (``settlement.ledger.payments``); a test that
needs a row in a given state, or with a column no transition writes (an amount, a creation time),
puts it there with SQL, as a crash or an operator could.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import update

from settlement.ledger import Ledger, Payment


def force_row(ledger: Ledger, payment_id: int, **fields: Any) -> None:
    values = {key: value.value if isinstance(value, enum.Enum) else value for key, value in fields.items()}
    table = Payment.__table__
    with ledger.engine.begin() as connection:
        result = connection.execute(update(table).where(table.c.id == payment_id).values(**values))
    assert result.rowcount == 1, f"payment {payment_id} not found"
