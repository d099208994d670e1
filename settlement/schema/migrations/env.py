"""Alembic environment: the connection comes from ``settlement.schema.migrations.alembic_config``
(``open_ledger`` and ``x402gw db upgrade``), or an engine from ``sqlalchemy.url`` for the alembic CLI."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import settlement.audit.records  # noqa: F401  (registers the audit tables on the metadata)
from settlement.ledger.models import Base, create_ledger_engine
from settlement.schema.migrations import include_object


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things: batch mode copies the table
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection in config.attributes")
    engine = create_ledger_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
