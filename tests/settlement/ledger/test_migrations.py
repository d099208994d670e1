"""Alembic migrations of the ledger: an upgrade from the first schema keeps every row and adds the
new columns, and the migrations build exactly the schema the models describe (both backends)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from settlement.audit import AuditEvent, AuditTrail
from settlement.ledger import Base, PaymentState, create_ledger_engine
from settlement.schema import open_ledger
from settlement.schema.migrations import (
    alembic_config,
    current_revision,
    head_revision,
    include_object,
    migrate,
)
from tests.support.ledger_rows import force_row

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrated.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = create_ledger_engine(url)
    _drop_everything(engine)
    try:
        yield engine
    finally:
        _drop_everything(engine)  # the PostgreSQL database lives for the whole session
        engine.dispose()


def _drop_everything(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("webhook_outbox", "stored_responses", "payments", "audit_records", "audit_head", "alembic_version"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def _upgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def _insert_first_schema_rows(engine: Engine) -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    with engine.begin() as conn:
        for i, (amount, state) in enumerate([(2000, "settled"), (2**200, "failed"), (1, "pending")]):
            conn.execute(
                text(
                    "INSERT INTO payments (request_id, created_at, updated_at, owner, tool, method, path, payer,"
                    " pay_to, amount, network, asset, nonce, valid_before, \"authorization\", state, tx_hash,"
                    " block_number) VALUES (:rid, :now, :now, 'acme', 'quote', 'GET', '/q', :payer, :pay_to,"
                    " :amount, 'eip155:31337', :asset, :nonce, 1700000000, '{}', :state, :tx, :block)"
                ),
                {
                    "rid": f"req-{i}", "now": now, "payer": PAYER, "pay_to": PAY_TO,
                    "amount": str(amount) if engine.dialect.name == "sqlite" else amount,
                    "asset": ASSET, "nonce": "0x" + f"{i:064x}", "state": state,
                    "tx": "0x" + f"{i:064x}" if state == "settled" else None, "block": 7 if state == "settled" else None,
                },
            )


def test_upgrade_from_the_first_schema_keeps_rows_and_adds_columns(empty_engine: Engine) -> None:
    _upgrade(empty_engine, "0001")
    columns = {c["name"] for c in inspect(empty_engine).get_columns("payments")}
    assert "payment_identifier" not in columns and "refund_owed" not in columns and "decimals" not in columns
    assert not inspect(empty_engine).has_table("stored_responses")
    _insert_first_schema_rows(empty_engine)

    ledger = open_ledger(empty_engine.url.render_as_string(hide_password=False))  # upgrades on open
    try:
        rows = ledger.all()
        assert [(r.request_id, r.amount, r.state, r.decimals, r.settle_mode, r.refund_owed) for r in rows] == [
            ("req-0", 2000, PaymentState.SETTLED, 6, "after", None),
            ("req-1", 2**200, PaymentState.FAILED, 6, "after", None),
            ("req-2", 1, PaymentState.PENDING, 6, "after", None),
        ]
        assert rows[0].tx_hash == "0x" + f"{0:064x}" and rows[0].block_number == 7
        assert rows[0].created_at.replace(tzinfo=UTC) == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
        with empty_engine.connect() as conn:
            assert current_revision(conn) == head_revision()
        inspector = inspect(empty_engine)
        assert inspector.has_table("stored_responses")
        assert {"payment_identifier", "fingerprint", "settle_mode", "refund_owed", "refund_reason", "refund_tx",
                "refunded_at", "decimals"} <= {c["name"] for c in inspector.get_columns("payments")}
        # The new columns work: an idempotency key is unique, a response can be stored.
        force_row(ledger, rows[0].id, payment_identifier="pid-1", refund_owed=2000)
        ledger.store_response(rows[0].id, (200, [("content-type", "text/plain")], b"ok"))
        assert ledger.by_payment_identifier("pid-1").refund_owed == 2000  # type: ignore[union-attr]
        assert ledger.stored_response(rows[0].id) == (200, [("content-type", "text/plain")], b"ok")
    finally:
        ledger.close()


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include_object})
        return list(compare_metadata(context, Base.metadata))


def test_migrations_build_the_schema_the_models_describe(empty_engine: Engine) -> None:
    _upgrade(empty_engine, "head")

    assert _diff(empty_engine) == []
    # And the comparison does see a difference when there is one.
    with empty_engine.begin() as conn:
        conn.execute(text("ALTER TABLE payments DROP COLUMN fingerprint"))
    assert [d[0] for d in _diff(empty_engine)] == ["add_column"]


def test_a_pre_alembic_database_of_today_is_adopted(empty_engine: Engine) -> None:
    """Made by create_all before Alembic (no alembic_version, no decimals column): stamped 0001,
    then revision 2 adds only what is missing."""
    Base.metadata.create_all(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("ALTER TABLE payments DROP COLUMN decimals"))

    assert migrate(empty_engine) == "upgraded"
    assert "decimals" in {c["name"] for c in inspect(empty_engine).get_columns("payments")}
    assert migrate(empty_engine) == "current"


def test_a_fresh_database_is_created_and_stamped(empty_engine: Engine) -> None:
    assert migrate(empty_engine) == "created"
    assert migrate(empty_engine) == "current"
    with empty_engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert _diff(empty_engine) == []


def test_the_audit_trail_keeps_its_chain_when_0004_drops_its_extra_indexes(empty_engine: Engine) -> None:
    """0004 drops the indexes no reader uses (on SQLite by rebuilding the table): every record, id
    and hash survives, and the chain still verifies and grows."""
    _upgrade(empty_engine, "0003")
    url = empty_engine.url.render_as_string(hide_password=False)
    trail = AuditTrail(url)
    try:
        trail.append([AuditEvent(f"req-{i}", "challenge_issued", {"amount": str(1000 + i)}, None, "quote") for i in range(5)])
        before = [(r.id, r.seq, r.hash) for r in trail.records()]
    finally:
        trail.close()
    assert any(u["column_names"] == ["hash"] for u in inspect(empty_engine).get_unique_constraints("audit_records"))

    _upgrade(empty_engine, "head")

    schema = inspect(empty_engine)
    assert not any(u["column_names"] == ["hash"] for u in schema.get_unique_constraints("audit_records"))
    assert any(u["column_names"] == ["seq"] for u in schema.get_unique_constraints("audit_records"))
    indexed = {tuple(ix["column_names"]) for ix in schema.get_indexes("audit_records")}
    assert {("recorded_at",), ("request_id",)} <= indexed
    assert not indexed & {("event",), ("payer",), ("tool",), ("hash",)}
    trail = AuditTrail(url)
    try:
        assert [(r.id, r.seq, r.hash) for r in trail.records()] == before
        trail.append([AuditEvent("req-after", "challenge_issued", {"amount": "7"})])
        report = trail.verify()
        assert report.intact and report.records == 6
    finally:
        trail.close()


def test_0005_and_0006_add_gas_columns_and_the_webhook_outbox_keeping_rows(empty_engine: Engine) -> None:
    """A ledger at 0004 with rows: 0005 adds the nullable gas columns (old rows: no gas, as
    ``ledger backfill-gas`` expects), 0006 the empty outbox; both run again as no-ops, and go back down."""
    _upgrade(empty_engine, "0004")
    _insert_first_schema_rows(empty_engine)
    assert not inspect(empty_engine).has_table("webhook_outbox")

    _upgrade(empty_engine, "head")
    schema = inspect(empty_engine)
    assert {"gas_used", "gas_price", "gas_cost"} <= {c["name"] for c in schema.get_columns("payments")}
    assert schema.has_table("webhook_outbox")
    ledger = open_ledger(empty_engine.url.render_as_string(hide_password=False))
    try:
        rows = ledger.all()
        assert [(r.request_id, r.gas_used, r.gas_price, r.gas_cost) for r in rows] == [
            ("req-0", None, None, None), ("req-1", None, None, None), ("req-2", None, None, None),
        ]
        ledger.record_gas(rows[0].id, {"gas_used": 61_000, "gas_price": 2**70, "gas_cost": 61_000 * 2**70})
        assert ledger.get(rows[0].id).gas_cost == 61_000 * 2**70  # type: ignore[union-attr]  # exact, 78 digits
    finally:
        ledger.close()
    assert _diff(empty_engine) == []

    with empty_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004")
    schema = inspect(empty_engine)
    assert not schema.has_table("webhook_outbox")
    assert not {"gas_used", "gas_price", "gas_cost"} & {c["name"] for c in schema.get_columns("payments")}
