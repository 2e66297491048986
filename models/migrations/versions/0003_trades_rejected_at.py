"""trades.rejected_at: trades of a rejected settlement are retried one connection at a time

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("trades", sa.Column("rejected_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("trades", "rejected_at")
