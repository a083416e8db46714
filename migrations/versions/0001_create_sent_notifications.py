"""Create sent_notifications.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "sent_notifications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("claim_token", sa.String(64)),
        sa.Column("claimed_at", Timestamp),
        sa.Column("next_attempt_at", Timestamp),
        sa.Column("sent_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.UniqueConstraint("rule", "user_id", name="uq_sent_notifications_rule_user"),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_sent_notifications_status"),
    )
    op.create_index("ix_sent_notifications_status_rule", "sent_notifications", ["status", "rule"])
    op.create_index("ix_sent_notifications_claim_token", "sent_notifications", ["claim_token"])


def downgrade() -> None:
    op.drop_index("ix_sent_notifications_claim_token", table_name="sent_notifications")
    op.drop_index("ix_sent_notifications_status_rule", table_name="sent_notifications")
    op.drop_table("sent_notifications")
