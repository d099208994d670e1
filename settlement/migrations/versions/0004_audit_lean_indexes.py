"""The audit trail keeps the indexes its readers use (time, request id, sequence) and drops those on
event, payer and tool: nothing queries by them, and every append paid for keeping them (about a
third of an audit record's insert cost, on the paid path of every request).

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


def upgrade() -> None:
    existing = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("audit_records")}
    for column in DROPPED:
        name = f"ix_audit_records_{column}"
        if name in existing:
            op.drop_index(name, table_name="audit_records")


def downgrade() -> None:
    for column in DROPPED:
        op.create_index(f"ix_audit_records_{column}", "audit_records", [column])
