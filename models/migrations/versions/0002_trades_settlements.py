"""trades, settlements and task runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:10:00
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _now(name: str) -> sa.Column[datetime]:
    return sa.Column(
        name, sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "settlements",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("amounts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("body", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("bitgo_id", sa.Text(), nullable=True),
        sa.Column("bitgo_status", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _now("created_at"),
        _now("updated_at"),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('preparing', 'pending', 'completed', 'rejected', 'conflict')",
            name=op.f("ck_settlements_status"),
        ),
        sa.CheckConstraint(
            "status = 'preparing' OR body IS NOT NULL OR amounts = '{}'",
            name=op.f("ck_settlements_body"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settlements")),
        sa.UniqueConstraint("external_id", name=op.f("uq_settlements_external_id")),
        sa.UniqueConstraint("seq", name=op.f("uq_settlements_seq")),
    )
    op.create_index(
        "uq_settlements_open",
        "settlements",
        [sa.text("(true)")],
        unique=True,
        postgresql_where=sa.text("status IN ('preparing', 'pending')"),
    )
    op.create_table(
        "trades",
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("connection_pk", sa.BigInteger(), nullable=False),
        sa.Column("partners_connection_id", sa.Text(), nullable=False),
        sa.Column("deltas", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("settlement_id", sa.Uuid(), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        _now("created_at"),
        sa.CheckConstraint(
            "settled_at IS NULL OR settlement_id IS NOT NULL", name=op.f("ck_trades_settled_by")
        ),
        sa.ForeignKeyConstraint(
            ["connection_pk"], ["connections.id"], name=op.f("fk_trades_connection_pk")
        ),
        sa.ForeignKeyConstraint(
            ["settlement_id"], ["settlements.id"], name=op.f("fk_trades_settlement_id")
        ),
        sa.PrimaryKeyConstraint("external_id", name=op.f("pk_trades")),
    )
    op.create_index("ix_trades_settlement_id", "trades", ["settlement_id"])
    op.create_index(
        "ix_trades_unsettled",
        "trades",
        ["created_at"],
        postgresql_where=sa.text("settlement_id IS NULL"),
    )
    op.create_table(
        "task_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("summary", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        _now("finished_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_runs")),
    )
    op.create_index("ix_task_runs_task_finished_at", "task_runs", ["task", "finished_at"])


def downgrade() -> None:
    op.drop_table("task_runs")
    op.drop_table("trades")
    op.drop_index("uq_settlements_open", table_name="settlements")
    op.drop_table("settlements")
