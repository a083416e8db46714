"""Operator queries on sent_notifications: history, reset and retry.

Each change is one conditional statement in its own transaction, like the
claims in store.py, so an operator command and a running `poller run`
never both own a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from poller.errors import PollerError
from poller.schema import sent_notifications as sn

log = logging.getLogger(__name__)


class NotificationNotFound(PollerError):
    """No sent_notifications row matches the operator's filter."""


class NotificationBusy(PollerError):
    """A run holds the claim on a row that the operator asked to change."""


@dataclasses.dataclass(frozen=True)
class Notification:
    """One sent_notifications row, with timestamps in naive UTC as stored."""

    id: int
    rule: str
    user_id: str
    email: str
    status: str
    attempts: int
    last_error: str | None
    message_id: str
    created_at: datetime
    claimed_at: datetime | None
    sent_at: datetime | None
    next_attempt_at: datetime | None
    claimed: bool  # a run's claim token is set

    def as_dict(self) -> dict[str, Any]:
        """Return the row for JSON or CSV, with timestamps in ISO 8601 UTC."""
        data = dataclasses.asdict(self)
        for key in ("created_at", "claimed_at", "sent_at", "next_attempt_at"):
            value = data[key]
            data[key] = value.replace(tzinfo=timezone.utc).isoformat() if value is not None else None
        return data

    def in_lease(self, now: datetime, lease: float) -> bool:
        """True while a run may be sending this notification (a pending claim younger than the lease)."""
        if self.status != "pending" or not self.claimed or self.claimed_at is None:
            return False
        return self.claimed_at >= now - timedelta(seconds=lease)


COLUMNS = (
    sn.c.id,
    sn.c.rule,
    sn.c.user_id,
    sn.c.email,
    sn.c.status,
    sn.c.attempts,
    sn.c.last_error,
    sn.c.message_id,
    sn.c.created_at,
    sn.c.claimed_at,
    sn.c.sent_at,
    sn.c.next_attempt_at,
    sn.c.claim_token.is_not(None),
)


def _notifications(connection: sa.Connection, query: sa.Select[Any]) -> list[Notification]:
    notifications = []
    for row in connection.execute(query).all():
        values = list(row)
        values[12] = bool(values[12])
        notifications.append(Notification(*values))
    return notifications


def history(
    engine: sa.Engine,
    *,
    user_id: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    rule: str | None = None,
    limit: int | None = None,
) -> list[Notification]:
    """Return notifications newest first (by creation time), filtered by each argument that is not None.

    `since` is naive UTC and compared with created_at, the time the
    notification was first claimed.
    """
    query = sa.select(*COLUMNS).order_by(sn.c.created_at.desc(), sn.c.id.desc())
    if user_id is not None:
        query = query.where(sn.c.user_id == user_id)
    if status is not None:
        query = query.where(sn.c.status == status)
    if since is not None:
        query = query.where(sn.c.created_at >= since)
    if rule is not None:
        query = query.where(sn.c.rule == rule)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as connection:
        return _notifications(connection, query)


def _in_lease_condition(now: datetime, lease: float) -> sa.ColumnElement[bool]:
    # The SQL form of Notification.in_lease, repeated in each DELETE so a
    # row claimed after the operator looked is never removed.
    return sa.and_(
        sn.c.status == "pending",
        sn.c.claim_token.is_not(None),
        sn.c.claimed_at >= now - timedelta(seconds=lease),
    )


def find_for_reset(engine: sa.Engine, user_id: str, rule: str | None) -> list[Notification]:
    """Return the user's notifications (for one rule, or all), oldest first.

    Raises NotificationNotFound when there are none.
    """
    query = sa.select(*COLUMNS).where(sn.c.user_id == user_id).order_by(sn.c.id)
    if rule is not None:
        query = query.where(sn.c.rule == rule)
    with engine.connect() as connection:
        rows = _notifications(connection, query)
    if not rows:
        which = f" for rule {rule!r}" if rule is not None else ""
        raise NotificationNotFound(
            f"User {user_id!r} has no recorded notification{which}, so there is nothing to reset. "
            "Check the id with `poller history --user ID`."
        )
    return rows


def check_not_busy(rows: Sequence[Notification], now: datetime, lease: float) -> None:
    """Raise NotificationBusy if a run may be sending any of these rows right now."""
    busy = [row for row in rows if row.in_lease(now, lease)]
    if busy:
        names = ", ".join(f"{row.rule} (claimed at {row.claimed_at:%Y-%m-%d %H:%M:%S} UTC)" for row in busy)
        raise NotificationBusy(
            f"User {busy[0].user_id!r} has a notification that a run is sending now: {names}. "
            f"Try again when that run has finished, or after the lease of {lease:g} s has run out."
        )


def reset(engine: sa.Engine, rows: Sequence[Notification], now: datetime, lease: float) -> int:
    """Delete these rows, except any that a run claimed since they were read; return how many went.

    A deleted row makes the user due again, so the next run notifies them
    if they still reach the rule's threshold.
    """
    ids = [row.id for row in rows]
    with engine.begin() as connection:
        result = connection.execute(sn.delete().where(sn.c.id.in_(ids), ~_in_lease_condition(now, lease)))
    deleted = int(result.rowcount)
    log.debug("Reset %d notification(s) of user %s", deleted, rows[0].user_id if rows else "?")
    return deleted


def retry_failed(engine: sa.Engine, *, user_id: str | None = None, rule: str | None = None) -> int:
    """Make failed notifications pending and unclaimed with zero attempts; return how many.

    The next run claims them like a released transient failure and sends
    them with their original Message-ID. last_error stays until then, so
    that `poller history` still shows why they failed.
    """
    statement = (
        sn.update()
        .where(sn.c.status == "failed")
        .values(status="pending", attempts=0, claim_token=None, claimed_at=None, next_attempt_at=None)
    )
    if user_id is not None:
        statement = statement.where(sn.c.user_id == user_id)
    if rule is not None:
        statement = statement.where(sn.c.rule == rule)
    with engine.begin() as connection:
        result = connection.execute(statement)
    count = int(result.rowcount)
    log.debug("Made %d failed notification(s) eligible again", count)
    return count
