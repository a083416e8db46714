"""Poller's own table. The users table belongs to another application."""

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

# MySQL's plain DATETIME drops fractions of a second.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# Alembic keeps its revision in this table rather than the usual
# alembic_version, which the application that owns the users table may use.
VERSION_TABLE = "poller_alembic_version"

# The newest migration in migrations/versions. `poller run` compares the
# version table with it without importing Alembic; a test checks that it
# matches Alembic's head, so a new migration must update it.
HEAD_REVISION = "0001"

metadata = MetaData()

# One row per (rule, user). A row is inserted as `pending` with a claim
# (claim_token, claimed_at) before any mail leaves. It becomes `sent` once
# the server accepted the message, and `failed` after a permanent refusal or
# too many transient errors. A transient error releases the claim
# (claim_token NULL) and sets next_attempt_at for the next run.
sent_notifications = Table(
    "sent_notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule", String(100), nullable=False),
    # The users table's id, as text, so that any id type fits.
    Column("user_id", String(255), nullable=False),
    Column("email", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("message_id", String(255), nullable=False),
    Column("claim_token", String(64)),
    Column("claimed_at", Timestamp),
    Column("next_attempt_at", Timestamp),
    Column("sent_at", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("rule", "user_id", name="uq_sent_notifications_rule_user"),
    CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_sent_notifications_status"),
    Index("ix_sent_notifications_status_rule", "status", "rule"),
    Index("ix_sent_notifications_claim_token", "claim_token"),
)
