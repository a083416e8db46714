"""store.mark_sent on each database, through a kept-open connection and the engine."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa

from poller import store
from poller.message import Recipient
from poller.schema import sent_notifications
from poller.settings import Rule
from tests.conftest import upgrade

RULE = Rule("points-100", Decimal(100), "s", "b")
NOW = datetime(2026, 5, 1, 12, 30, 45, 123456)


def claim_row(engine: sa.Engine, token: str) -> store.Claim:
    with engine.begin() as connection:
        row_id = connection.execute(
            sent_notifications.insert().values(
                rule=RULE.name,
                user_id="7",
                email="old@example.com",
                status="pending",
                attempts=2,
                message_id="<m@example.com>",
                claim_token=token,
                claimed_at=NOW,
                created_at=NOW,
                last_error="451 later",
            )
        ).inserted_primary_key[0]
    recipient = Recipient("7", "new@example.com", "Seven", Decimal(150))
    return store.Claim(row_id, "token-1", RULE, "<m@example.com>", 2, recipient)


def stored(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(sent_notifications)).mappings().one())


def test_mark_sent_through_open_connection(database_url: str) -> None:
    upgrade(database_url)
    engine = sa.create_engine(database_url)
    claim = claim_row(engine, "token-1")

    with engine.connect() as connection:
        kept = store.mark_sent(connection, claim, NOW)
    row = stored(engine)
    engine.dispose()

    assert kept is True
    assert row["status"] == "sent"
    assert row["sent_at"] == NOW
    assert row["attempts"] == 3
    assert row["email"] == "new@example.com"
    assert row["claim_token"] is None
    assert row["last_error"] is None


def test_mark_sent_through_engine(database_url: str) -> None:
    upgrade(database_url)
    engine = sa.create_engine(database_url)
    claim = claim_row(engine, "token-1")

    kept = store.mark_sent(engine, claim, NOW)
    row = stored(engine)
    engine.dispose()

    assert kept is True
    assert row["status"] == "sent"
    assert row["sent_at"] == NOW


def test_mark_sent_after_lost_claim(database_url: str) -> None:
    upgrade(database_url)
    engine = sa.create_engine(database_url)
    claim = claim_row(engine, "another-run")

    with engine.connect() as connection:
        kept = store.mark_sent(connection, claim, NOW)
    row = stored(engine)
    engine.dispose()

    assert kept is False
    assert row["status"] == "pending"
    assert row["claim_token"] == "another-run"
    assert row["attempts"] == 2
