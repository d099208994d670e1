"""The first ledger schema: one ``payments`` table (commit 8277f14, settlement/ledger.py).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the model types of that time: migrations never import today's models.
ATOMIC = sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "payments",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("tool", sa.String(64), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("pay_to", sa.String(42), nullable=False),
        sa.Column("amount", ATOMIC, nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("asset", sa.String(42), nullable=False),
        sa.Column("nonce", sa.String(66), nullable=False),
        sa.Column("valid_before", sa.BigInteger(), nullable=False),
        sa.Column("authorization", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error_reason", sa.String(128), nullable=True),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("tx_hash", sa.String(66), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("network", "asset", "payer", "nonce", name="uq_payment_authorization"),
    )
    for column in ("created_at", "owner", "tool", "payer", "pay_to", "state", "tx_hash"):
        op.create_index(f"ix_payments_{column}", "payments", [column])


def downgrade() -> None:
    op.drop_table("payments")
