"""outbox indexes: newest events and dead letters without reading the whole table

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_created_at", "outbox", ["created_at"])
    op.create_index(
        "ix_outbox_dead", "outbox", ["created_at"], postgresql_where=sa.text("status = 'dead'")
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_dead", table_name="outbox")
    op.drop_index("ix_outbox_created_at", table_name="outbox")
