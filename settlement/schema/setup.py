"""``open_ledger``: what the gateway, the CLIs and the tests call to get a ledger at start-up."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

from settlement.errors import LedgerError
from settlement.ledger import Ledger
from settlement.schema.migrations import migrate as migrate_schema


def open_ledger(url: str, *, migrate: bool = True) -> Ledger:
    """A ``Ledger`` on ``url``, its database brought to the head revision first (unless
    ``migrate=False``: a caller that knows the schema is current, or migrates it itself)."""
    ledger = Ledger(url)
    if migrate:
        try:
            migrate_schema(ledger.engine)
        except SQLAlchemyError as exc:
            ledger.close()
            raise LedgerError(f"cannot open the ledger database ({type(exc).__name__})") from exc
        except BaseException:
            ledger.close()
            raise
    return ledger
