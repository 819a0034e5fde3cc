"""api key rate limits, token budget and payload logging

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_rpm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rate_limit_tpm", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("rate_limit_concurrency", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("monthly_token_budget", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("log_payloads", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_column("log_payloads")
        batch_op.drop_column("monthly_token_budget")
        batch_op.drop_column("rate_limit_concurrency")
        batch_op.drop_column("rate_limit_tpm")
        batch_op.drop_column("rate_limit_rpm")
