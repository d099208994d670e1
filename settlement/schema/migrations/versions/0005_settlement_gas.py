"""Gas per payment: the settlement transaction's ``gasUsed`` and ``effectiveGasPrice`` and this
payment's share of their product in wei (``settlement.chain.gas``), all nullable: rows settled
before this revision, or through a remote facilitator, get them from ``x402gw ledger backfill-gas``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ATOMIC = sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite")


def new_columns() -> tuple[sa.Column[object], ...]:
    return (
        sa.Column("gas_used", sa.BigInteger(), nullable=True),
        sa.Column("gas_price", ATOMIC, nullable=True),
        sa.Column("gas_cost", ATOMIC, nullable=True),
    )


def upgrade() -> None:
    existing = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("payments")}
    missing = [column for column in new_columns() if column.name not in existing]
    if missing:
        with op.batch_alter_table("payments") as batch:
            for column in missing:
                batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        for column in reversed(new_columns()):
            batch.drop_column(column.name)
