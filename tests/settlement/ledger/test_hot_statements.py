"""The ledger's hot statements (``settlement.ledger.statements``) on SQLite and PostgreSQL: what they
write reads back through SQLAlchemy exactly as its own writes did, and driver errors come out as
SQLAlchemy's exceptions (so a duplicate is still an ``IntegrityError`` and a write failure still a
``LedgerError``)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from settlement.errors import LedgerError
from settlement.ledger import Ledger, Payment, PaymentState, settled_copy
from settlement.ledger.statements import HotStatement
from tests.settlement.ledger.test_ledger import fields


def test_hot_writes_read_back_typed(ledger: Ledger) -> None:
    """Datetimes, huge atomic amounts and cleared columns written on the driver's cursor read back
    through the ORM with their types and values."""
    row = ledger.record_verified(**fields(amount=2**256 - 1))
    ledger.begin_settlement(row.id, (200, [("content-type", "application/json")], b'{"ok":1}'), amount=2**200)
    ledger.mark_settled(row.id, tx_hash="0x" + "ab" * 32, block_number=7)
    stored = ledger.get(row.id)
    assert stored is not None
    assert stored.state == PaymentState.SETTLED.value and stored.amount == 2**200
    assert stored.tx_hash == "0x" + "ab" * 32 and stored.block_number == 7 and stored.upstream_status == 200
    assert isinstance(stored.created_at, datetime) and isinstance(stored.updated_at, datetime)
    assert abs((stored.updated_at.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()) < 600
    assert ledger.stored_response(row.id) == (200, [("content-type", "application/json")], b'{"ok":1}')
    found = ledger.by_authorization(row.network, row.asset, row.payer, row.nonce)
    assert found is not None and found.id == row.id and found.amount == 2**200
    assert ledger.by_authorization(row.network, row.asset, row.payer, "0x" + "00" * 32) is None


def test_a_transition_from_a_wrong_state_writes_nothing(ledger: Ledger) -> None:
    row = ledger.record_verified(**fields())
    ledger.void(row.id, "upstream_failed")
    with pytest.raises(LedgerError) as refused:
        ledger.begin_settlement(row.id, (200, [], b"paid"))
    assert refused.value.code == "invalid_transition"
    after = ledger.get(row.id)
    assert after is not None and after.state == PaymentState.VOIDED.value and after.upstream_status is None
    assert ledger.stored_response(row.id) is None


def test_driver_errors_are_sqlalchemy_errors(ledger: Ledger) -> None:
    """A duplicate on the driver's cursor is SQLAlchemy's IntegrityError; nothing half-written stays."""
    table = Payment.__table__
    first = fields()
    ledger.record_verified(**first)
    now = datetime.now(UTC)
    values = {**fields(), "request_id": first["request_id"], "state": "verified", "created_at": now, "updated_at": now}
    statement = HotStatement(insert(table), ledger.engine.dialect, values, {"settle_mode": "after", "decimals": 6})
    with pytest.raises(IntegrityError), ledger.engine.begin() as connection:
        statement.execute(connection, values)
    with ledger.engine.connect() as connection:
        assert len(connection.execute(select(table.c.id)).all()) == 1


def test_a_statement_needs_every_value_it_binds(ledger: Ledger) -> None:
    table = Payment.__table__
    statement = HotStatement(update(table).where(table.c.id == bindparam("pid")), ledger.engine.dialect, ["state"])
    with pytest.raises(KeyError, match="pid"):
        statement.parameters({"state": "settled", "updated_at": datetime.now(UTC)})
    # An ``onupdate`` column is bound too: a caller that forgets it is told, not given a NULL.
    with pytest.raises(KeyError, match="updated_at"):
        statement.parameters({"state": "settled", "pid": 1})


def test_rows_built_without_the_constructor_read_like_loaded_ones(ledger: Ledger) -> None:
    """``record_verified``'s row and ``settled_copy`` are built without ``Payment(...)``: every
    column reads as the stored row's, and the copy leaves the recorded row as it was."""
    row = ledger.record_verified(**fields(amount=12_345))
    stored = ledger.get(row.id)
    assert stored is not None
    for column in Payment.__table__.columns.keys():
        if column not in ("created_at", "updated_at"):  # SQLite hands datetimes back without their zone
            assert getattr(row, column) == getattr(stored, column), column
    copy = settled_copy(row, tx_hash="0x" + "cd" * 32, block_number=9, amount=12_000)
    assert (copy.state, copy.tx_hash, copy.block_number, copy.amount) == ("settled", "0x" + "cd" * 32, 9, 12_000)
    assert (row.state, row.tx_hash, row.block_number, row.amount) == ("verified", None, None, 12_345)
    assert copy.id == row.id and copy.nonce == row.nonce and copy.refund_owed is None


def test_sqlite_datetimes_are_bound_as_sqlalchemy_binds_them() -> None:
    """The hot statements' own SQLite DATETIME processor writes the very text SQLAlchemy's does."""
    from datetime import date, timedelta, timezone

    from sqlalchemy import Column, DateTime, MetaData, Table, create_engine

    table = Table("t", MetaData(), Column("at", DateTime(timezone=True)))
    dialect = create_engine("sqlite://").dialect
    hot = HotStatement(insert(table), dialect, ["at"])
    theirs = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    assert theirs is not None
    values = [datetime(2026, 12, 5, 18, 46, 7, 214625, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5),
              datetime(999, 1, 1, tzinfo=UTC), datetime(5, 6, 7, 8, 9, 10, 11), datetime(9999, 12, 31, 23, 59, 59, 999999),
              datetime(2026, 6, 1, 12, tzinfo=timezone(timedelta(hours=-5, minutes=-30))), date(2026, 2, 3)]
    for value in values:
        assert hot.parameters({"at": value}) == [theirs(value)], value
    assert hot.parameters({"at": None}) == [None]
    with pytest.raises(TypeError):
        hot.parameters({"at": "2026-01-01"})
