"""The ledger database's schema, and opening it: migrations run explicitly at start-up.

The database holds the ledger's tables (``settlement.ledger.models``) and the audit trail's
(``settlement.audit.records``); one Alembic history (``migrations/``) owns both. This room sits
above both, so neither the ledger nor the audit trail imports the migrations: constructing a
``Ledger`` touches no schema, and ``open_ledger`` is the one place that migrates, then opens.
"""

from settlement.schema.migrations import current_revision, head_revision, migrate
from settlement.schema.setup import open_ledger

__all__ = ["current_revision", "head_revision", "migrate", "open_ledger"]
