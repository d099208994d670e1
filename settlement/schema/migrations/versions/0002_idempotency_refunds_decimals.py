"""Idempotency (payment-identifier, fingerprint), settle mode, refunds, stored responses, and the
token's decimals per payment (exports print exact decimal amounts without guessing).

Adds only what is missing, so a database created by ``create_all`` at any commit before Alembic
(stamped as 0001 by ``settlement.schema.migrations.migrate``) is adopted.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ATOMIC = sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite")


def new_columns() -> tuple[sa.Column[object], ...]:
    return (
        sa.Column("payment_identifier", sa.String(128), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        # Rows from before settle modes were all settled after the upstream answered.
        sa.Column("settle_mode", sa.String(16), nullable=False, server_default="after"),
        sa.Column("refund_owed", ATOMIC, nullable=True),
        sa.Column("refund_reason", sa.String(128), nullable=True),
        sa.Column("refund_tx", sa.String(66), nullable=True),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        # Every network the gateway sold on before this column was USDC-like: 6 decimals.
        sa.Column("decimals", sa.Integer(), nullable=False, server_default="6"),
    )


IDENTIFIER_UNIQUE = "payments_payment_identifier_key"  # PostgreSQL's own name for create_all's constraint


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = {column["name"] for column in inspector.get_columns("payments")}
    missing = [column for column in new_columns() if column.name not in existing]
    if missing:
        with op.batch_alter_table("payments") as batch:
            for column in missing:
                batch.add_column(column)
            if "payment_identifier" not in existing:
                batch.create_unique_constraint(IDENTIFIER_UNIQUE, ["payment_identifier"])
    if not inspector.has_table("stored_responses"):
        op.create_table(
            "stored_responses",
            sa.Column(
                "payment_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                sa.ForeignKey("payments.id", ondelete="CASCADE"),
                primary_key=True,
            ),
            sa.Column("status", sa.Integer(), nullable=False),
            sa.Column("headers", sa.Text(), nullable=False),
            sa.Column("body", sa.LargeBinary(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("stored_responses")
    with op.batch_alter_table("payments") as batch:
        batch.drop_constraint(IDENTIFIER_UNIQUE, type_="unique")
        for column in reversed(new_columns()):
            batch.drop_column(column.name)
