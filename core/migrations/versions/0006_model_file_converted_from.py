"""model_file.converted_from: safetensors converted from pickle-based weights

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 08:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_file", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("converted_from", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("model_file", schema=None) as batch_op:
        batch_op.drop_column("converted_from")
