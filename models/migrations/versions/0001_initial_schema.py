"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 15:52:18.021950
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("partners_connection_id", sa.Text(), nullable=False),
        sa.Column("partners_client_id", sa.Text(), nullable=False),
        sa.Column("connection_id", sa.Uuid(), nullable=False),
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("client_wallet_id", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connections")),
        sa.UniqueConstraint("connection_id", name=op.f("uq_connections_connection_id")),
        sa.UniqueConstraint(
            "partners_connection_id", name=op.f("uq_connections_partners_connection_id")
        ),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'delivered_locally', 'dead')",
            name=op.f("ck_outbox_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "accounts",
        sa.Column("connection_pk", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column(
            "available",
            sa.Numeric(precision=78, scale=0),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column(
            "pending_in",
            sa.Numeric(precision=78, scale=0),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column(
            "held", sa.Numeric(precision=78, scale=0), server_default=sa.text("0"), nullable=False
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("available >= 0", name=op.f("ck_accounts_available_non_negative")),
        sa.CheckConstraint("held >= 0", name=op.f("ck_accounts_held_non_negative")),
        sa.CheckConstraint("pending_in >= 0", name=op.f("ck_accounts_pending_in_non_negative")),
        sa.ForeignKeyConstraint(
            ["connection_pk"], ["connections.id"], name=op.f("fk_accounts_connection_pk")
        ),
        sa.PrimaryKeyConstraint("connection_pk", "currency", name=op.f("pk_accounts")),
    )
    op.create_table(
        "connection_tokens",
        sa.Column("token_sha256", sa.Text(), nullable=False),
        sa.Column("partners_client_id", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("connection_pk", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["connection_pk"], ["connections.id"], name=op.f("fk_connection_tokens_connection_pk")
        ),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_connection_tokens")),
        sa.UniqueConstraint("connection_pk", name=op.f("uq_connection_tokens_connection_pk")),
    )
    op.create_table(
        "transfers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("partners_transfer_id", sa.Uuid(), nullable=False),
        sa.Column("connection_pk", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("quantity", sa.Numeric(precision=78, scale=0), nullable=False),
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("connection_id", sa.Uuid(), nullable=False),
        sa.Column("partners_client_id", sa.Text(), nullable=False),
        sa.Column("partners_connection_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(status = 'rejected') = (rejection_reason IS NOT NULL)",
            name=op.f("ck_transfers_rejection_reason"),
        ),
        sa.CheckConstraint(
            "kind IN ('allocation', 'deallocation')", name=op.f("ck_transfers_kind")
        ),
        sa.CheckConstraint(
            "status = 'rejected' OR connection_pk IS NOT NULL",
            name=op.f("ck_transfers_reserved_has_account"),
        ),
        sa.CheckConstraint(
            "status IN ('reserved', 'rejected', 'cleared', 'released')",
            name=op.f("ck_transfers_status"),
        ),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_transfers_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["connection_pk"], ["connections.id"], name=op.f("fk_transfers_connection_pk")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfers")),
    )
    op.create_index("ix_transfers_connection_id", "transfers", ["connection_id"], unique=False)
    op.create_index(
        "ix_transfers_status_updated_at", "transfers", ["status", "updated_at"], unique=False
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("posting_id", sa.Uuid(), nullable=False),
        sa.Column("connection_pk", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=78, scale=0), nullable=False),
        sa.Column("transfer_id", sa.Uuid(), nullable=True),
        sa.Column("trade_external_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "account IN ('available', 'pending_in', 'held', 'network_clearing', 'trading')",
            name=op.f("ck_ledger_entries_account"),
        ),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_ledger_entries_amount_non_zero")),
        sa.ForeignKeyConstraint(
            ["connection_pk"], ["connections.id"], name=op.f("fk_ledger_entries_connection_pk")
        ),
        sa.ForeignKeyConstraint(
            ["transfer_id"], ["transfers.id"], name=op.f("fk_ledger_entries_transfer_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        "ix_ledger_entries_connection_pk_currency",
        "ledger_entries",
        ["connection_pk", "currency"],
        unique=False,
    )
    op.create_index(
        "ix_ledger_entries_transfer_id", "ledger_entries", ["transfer_id"], unique=False
    )

    # Ledger entries are append-only: the database itself refuses edits.
    op.execute(
        """
        CREATE FUNCTION ledger_entries_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'ledger_entries is append-only';
        END $$;
        CREATE TRIGGER ledger_entries_append_only
            BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_entries
            FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ledger_entries_append_only ON ledger_entries")
    op.execute("DROP FUNCTION ledger_entries_append_only()")
    op.drop_index("ix_ledger_entries_transfer_id", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_connection_pk_currency", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index("ix_transfers_status_updated_at", table_name="transfers")
    op.drop_index("ix_transfers_connection_id", table_name="transfers")
    op.drop_table("transfers")
    op.drop_table("connection_tokens")
    op.drop_table("accounts")
    op.drop_index(
        "ix_outbox_pending", table_name="outbox", postgresql_where=sa.text("status = 'pending'")
    )
    op.drop_table("outbox")
    op.drop_table("connections")
