"""Alembic migrations of the ledger schema, runnable from an installed package (no alembic.ini).

``migrate(engine)`` is what ``settlement.schema.open_ledger`` runs at start-up and what
``x402gw db upgrade`` runs:

* a database already at the head revision: one query, nothing else;
* an empty database: ``create_all`` from the models and a stamp of the head revision (fast, and
  the models are proven equal to the migrations by a test);
* an older schema: ``alembic upgrade head``. A database made by ``create_all`` before Alembic
  (no ``alembic_version`` table) is stamped as revision 1 first; revision 2 adds only what is
  missing, so such a database is adopted whatever code created it.

On PostgreSQL the whole run holds a transaction-level advisory lock, so replicas starting together
migrate once; on SQLite a replica that loses the race to create the tables retries.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

import settlement.audit.records  # noqa: F401  (registers the audit tables on the metadata)
from settlement.errors import LedgerError
from settlement.ledger.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent
FIRST_REVISION = "0001"
# The tables these migrations own (the ledger's and the audit trail's).
LEDGER_TABLES = ("payments", "stored_responses", "audit_records", "audit_head", "webhook_outbox")
_ADVISORY_LOCK_KEY = 4_020_402  # any constant shared by every x402gw process


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None
    return head


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Autogenerate and compare look at the ledger's tables only."""
    table = getattr(obj, "table", obj) if type_ != "table" else obj
    return getattr(table, "name", name) in LEDGER_TABLES


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _migrate(connection: Connection) -> str:
    """Bring one connection's database to head; returns what was done."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    context = MigrationContext.configure(connection)
    current = context.get_current_revision()
    if current is not None and current not in {rev.revision for rev in script_directory().walk_revisions()}:
        raise LedgerError(f"the ledger's schema (revision {current}) is newer than this x402gw's (head "
                          f"{head_revision()}): run a newer x402gw on it", code="ledger_newer_than_x402gw")
    has_payments = inspect(connection).has_table("payments")
    if current == head_revision() and has_payments:
        return "current"
    if not has_payments:
        # Empty (or emptied by drop_all, which leaves alembic_version behind): build and stamp.
        Base.metadata.create_all(connection, tables=[Base.metadata.tables[name] for name in LEDGER_TABLES])
        context.stamp(script_directory(), "head")
        return "created"
    if current is None:
        context.stamp(script_directory(), FIRST_REVISION)
    command.upgrade(alembic_config(connection), "head")
    return "upgraded"


def migrate(engine: Engine) -> str:
    """Bring the ledger database to the head revision: "current", "created" or "upgraded"."""
    attempts = 3 if engine.dialect.name == "sqlite" else 1
    for attempt in range(attempts):
        try:
            with engine.begin() as connection:
                return _migrate(connection)
        except OperationalError:
            # SQLite: another process created the tables between our check and our DDL.
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
