"""The audit trail's tables: hash-chained records of every gateway decision and the chain head.

Creates a table only when it is missing: before this revision the audit trail created its own
tables with ``create_all``, so databases of that time already have them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "audit_records" not in existing:
        op.create_table(
            "audit_records",
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
            sa.UniqueConstraint("seq"),
            sa.UniqueConstraint("hash"),
        )
        for column in ("recorded_at", "request_id", "event", "payer", "tool"):
            op.create_index(f"ix_audit_records_{column}", "audit_records", [column])
    if "audit_head" not in existing:
        op.create_table(
            "audit_head",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("seq", sa.BigInteger(), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_table("audit_records")
