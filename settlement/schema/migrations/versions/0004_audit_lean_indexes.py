"""The audit trail keeps the indexes its readers use (sequence, time, request id) and drops the rest:
the indexes on event, payer and tool, and the uniqueness of ``hash``. Nothing reads by them, and
every append paid for them on every request: a unique index on a random 64-character hash alone
was more than half an audit record's insert cost. The chain itself (each record names the previous
record's hash, ``seq`` stays unique) is what ``x402gw audit verify`` checks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DROPPED = ("event", "payer", "tool")
KEPT = ("recorded_at", "request_id")
COLUMNS = "id, seq, recorded_at, request_id, event, payer, tool, data, prev_hash, hash"


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("payer", sa.String(42), nullable=True),
        sa.Column("tool", sa.String(64), nullable=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = {index["name"] for index in inspector.get_indexes("audit_records")}
    for column in DROPPED:
        name = f"ix_audit_records_{column}"
        if name in existing:
            op.drop_index(name, table_name="audit_records")
    unique_hash = [u for u in inspector.get_unique_constraints("audit_records") if u["column_names"] == ["hash"]]
    if not unique_hash:
        return
    if bind.dialect.name != "sqlite" and unique_hash[0]["name"]:
        op.drop_constraint(unique_hash[0]["name"], "audit_records", type_="unique")
        return
    # SQLite cannot drop a constraint: the table is rebuilt without it, rows and ids kept.
    op.create_table("audit_records_rebuilt", *_columns(), sa.UniqueConstraint("seq"))
    op.execute(f"INSERT INTO audit_records_rebuilt ({COLUMNS}) SELECT {COLUMNS} FROM audit_records")
    op.drop_table("audit_records")
    op.rename_table("audit_records_rebuilt", "audit_records")
    for column in KEPT:
        op.create_index(f"ix_audit_records_{column}", "audit_records", [column])


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.create_unique_constraint("uq_audit_records_hash", ["hash"])
    for column in DROPPED:
        op.create_index(f"ix_audit_records_{column}", "audit_records", [column])
