"""The PostgreSQL schema, as SQLAlchemy Core tables."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

# Base units of any currency fit in 78 digits (2**256 has 78).
Amount = Numeric(78, 0, asdecimal=True)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


connections = Table(
    "connections",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("partners_connection_id", Text, nullable=False, unique=True),
    Column("partners_client_id", Text, nullable=False),
    Column("connection_id", Uuid, nullable=False, unique=True),
    Column("client_id", Uuid, nullable=False),
    Column("client_wallet_id", Text),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

connection_tokens = Table(
    "connection_tokens",
    metadata,
    # Only a SHA-256 of the token is kept: a database dump must not link accounts.
    Column("token_sha256", Text, primary_key=True),
    Column("partners_client_id", Text, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("connection_pk", BigInteger, ForeignKey("connections.id"), unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("used_at", DateTime(timezone=True)),
)

accounts = Table(
    "accounts",
    metadata,
    Column("connection_pk", BigInteger, ForeignKey("connections.id"), nullable=False),
    Column("currency", Text, nullable=False),
    Column("available", Amount, nullable=False, server_default=text("0")),
    Column("pending_in", Amount, nullable=False, server_default=text("0")),
    Column("held", Amount, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("connection_pk", "currency"),
    CheckConstraint("available >= 0", name="available_non_negative"),
    CheckConstraint("pending_in >= 0", name="pending_in_non_negative"),
    CheckConstraint("held >= 0", name="held_non_negative"),
)

transfers = Table(
    "transfers",
    metadata,
    # BitGo's allocationId or deallocationId: ONE unique index for both kinds,
    # so an id can never be an allocation and a deallocation.
    Column("id", Uuid, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("partners_transfer_id", Uuid, nullable=False),
    Column("connection_pk", BigInteger, ForeignKey("connections.id")),
    Column("currency", Text, nullable=False),
    Column("quantity", Amount, nullable=False),
    Column("client_id", Uuid, nullable=False),
    Column("connection_id", Uuid, nullable=False),
    Column("partners_client_id", Text, nullable=False),
    Column("partners_connection_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("rejection_reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('allocation', 'deallocation')", name="kind"),
    CheckConstraint("status IN ('reserved', 'rejected', 'cleared', 'released')", name="status"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint(
        "(status = 'rejected') = (rejection_reason IS NOT NULL)", name="rejection_reason"
    ),
    CheckConstraint(
        "status = 'rejected' OR connection_pk IS NOT NULL", name="reserved_has_account"
    ),
    Index("ix_transfers_status_updated_at", "status", "updated_at"),
    Index("ix_transfers_connection_id", "connection_id"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # The entries of one posting share a posting id and sum to zero.
    Column("posting_id", Uuid, nullable=False),
    Column("connection_pk", BigInteger, ForeignKey("connections.id"), nullable=False),
    Column("currency", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("amount", Amount, nullable=False),
    Column("transfer_id", Uuid, ForeignKey("transfers.id")),
    Column("trade_external_id", Text),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("amount <> 0", name="amount_non_zero"),
    CheckConstraint(
        "account IN ('available', 'pending_in', 'held', 'network_clearing', 'trading')",
        name="account",
    ),
    Index("ix_ledger_entries_connection_pk_currency", "connection_pk", "currency"),
    Index("ix_ledger_entries_transfer_id", "transfer_id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('pending', 'delivered', 'delivered_locally', 'dead')", name="status"
    ),
    Index(
        "ix_outbox_pending",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
    ),
    # The newest events and the dead letters, for the dashboard and `outbox list`.
    Index("ix_outbox_created_at", "created_at"),
    Index("ix_outbox_dead", "created_at", postgresql_where=text("status = 'dead'")),
)

trades = Table(
    "trades",
    metadata,
    # The exchange's id for a trading result: the idempotency key of POST /trades.
    Column("external_id", Text, primary_key=True),
    Column("connection_pk", BigInteger, ForeignKey("connections.id"), nullable=False),
    Column("partners_connection_id", Text, nullable=False),
    # {currency: signed base-unit string}, as applied; settlement nets these.
    Column("deltas", JSONB, nullable=False),
    Column("settlement_id", Uuid, ForeignKey("settlements.id")),
    Column("settled_at", DateTime(timezone=True)),
    # When a settlement it was in was last rejected: from then on it is netted with its own
    # connection's trades only, so one connection BitGo refuses cannot hold up the others.
    Column("rejected_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("settled_at IS NULL OR settlement_id IS NOT NULL", name="settled_by"),
    Index("ix_trades_settlement_id", "settlement_id"),
    Index(
        "ix_trades_unsettled",
        "created_at",
        postgresql_where=text("settlement_id IS NULL"),
    ),
)

settlements = Table(
    "settlements",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("seq", BigInteger, Identity(), nullable=False, unique=True),
    # Derived from seq and the trades included; the idempotency key at BitGo.
    Column("external_id", Text, nullable=False, unique=True),
    Column("status", Text, nullable=False),
    # {connectionId: {currency: signed string}}: BitGo's settlementAmounts.
    Column("amounts", JSONB, nullable=False),
    # The exact signed body, stored before the first post and re-posted unchanged.
    Column("body", JSONB),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("bitgo_id", Text),
    Column("bitgo_status", Text),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finalized_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('preparing', 'pending', 'completed', 'rejected', 'conflict')", name="status"
    ),
    CheckConstraint("status = 'preparing' OR body IS NOT NULL OR amounts = '{}'", name="body"),
    # At most one settlement in flight: trades are netted into one at a time.
    Index(
        "uq_settlements_open",
        text("(true)"),
        unique=True,
        postgresql_where=text("status IN ('preparing', 'pending')"),
    ),
)

task_runs = Table(
    "task_runs",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("task", Text, nullable=False),
    Column("task_id", Text),
    Column("summary", JSONB, nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_task_runs_task_finished_at", "task", "finished_at"),
)
