"""Finding due users and claiming, marking and releasing notifications.

Every state change is a conditional statement in its own short
transaction: a claim is an INSERT that ignores conflicts or an UPDATE that
checks the row is still free, and a mark only touches a row that still
carries this run's claim token. Two runs can therefore never both own a
notification, with or without the lock file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa

from poller.db import UsersTable
from poller.message import InvalidRow, Recipient, clean_name, normalize_address, parse_points
from poller.schema import sent_notifications as sn
from poller.settings import Rule

log = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 255  # sent_notifications.user_id
CLAIM_ATTEMPTS = 5  # retries of a claim that lost a deadlock on PostgreSQL or MariaDB


def utcnow() -> datetime:
    """Return the current time as naive UTC, the form stored in the database."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _threshold_param(threshold: Decimal) -> int | float:
    # Drivers disagree on binding Decimal; an int or float compares the same.
    return int(threshold) if threshold == threshold.to_integral_value() else float(threshold)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A row of the users table that the due query returned."""

    key: Any  # the id as the database returned it, for paging and lookups
    user_id: str
    email: Any
    points: Any
    name: Any


@dataclasses.dataclass(frozen=True)
class Skipped:
    user_id: str
    reason: str


def due_condition(users: UsersTable, rule: Rule) -> sa.ColumnElement[bool]:
    """Return the SQL filter for users who reached the rule's threshold.

    Where SQLite compares the points column as text, every text value is
    selected too and validate() compares it numerically.
    """
    reached = users.points >= _threshold_param(rule.threshold)
    if users.points_compare_as_text:
        return sa.or_(reached, sa.func.typeof(users.points).in_(("text", "blob")))
    return reached


def not_notified(users: UsersTable, rule: Rule) -> sa.ColumnElement[bool]:
    """Build the anti-join condition: no sent_notifications row for this rule and user."""
    return ~sa.exists().where(sn.c.rule == rule.name, sn.c.user_id == sa.cast(users.id, sa.String))


def due_users_query(users: UsersTable, rule: Rule, after: Any, limit: int) -> sa.Select[Any]:
    """Select the next `limit` due users with an id greater than `after`, in id order."""
    name = users.name if users.name is not None else sa.null()
    query = (
        sa.select(users.id, users.email, users.points, name)
        .where(due_condition(users, rule), not_notified(users, rule))
        .order_by(users.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(users.id > after)
    return query


def fetch_due_users(
    connection: sa.Connection, users: UsersTable, rule: Rule, after: Any, limit: int
) -> list[Candidate]:
    rows = connection.execute(due_users_query(users, rule, after, limit)).all()
    return [Candidate(row[0], str(row[0]), row[1], row[2], row[3]) for row in rows]


def iter_due_users(engine: sa.Engine, users: UsersTable, rule: Rule, batch_size: int) -> Iterator[list[Candidate]]:
    """Yield due users in batches, each read in its own short transaction.

    Paging by id, rather than holding one cursor open, lets SQLite commit
    claims between batches; users claimed meanwhile drop out of later pages.
    """
    after = None
    while True:
        with engine.connect() as connection:
            batch = fetch_due_users(connection, users, rule, after, batch_size)
        if not batch:
            return
        yield batch
        after = batch[-1].key


def validate(candidate: Candidate, rule: Rule, *, check_points: bool = True) -> Recipient | Skipped | None:
    """Check a candidate's fields.

    Returns a Recipient to notify, Skipped with the reason for a bad row, or
    None when the points turn out to be below the threshold (SQLite's text
    comparison can select such rows). With `check_points` false, points
    below the threshold or invalid are accepted as the threshold itself.
    """
    if len(candidate.user_id) > MAX_USER_ID_LENGTH:
        return Skipped(candidate.user_id[:40] + "...", f"id is longer than {MAX_USER_ID_LENGTH} characters")
    try:
        points = parse_points(candidate.points)
    except InvalidRow as exc:
        if check_points:
            return Skipped(candidate.user_id, str(exc))
        points = rule.threshold
    if points < rule.threshold:
        if check_points:
            return None
        points = rule.threshold
    try:
        email = normalize_address(candidate.email)
    except InvalidRow as exc:
        return Skipped(candidate.user_id, str(exc))
    return Recipient(candidate.user_id, email, clean_name(candidate.name), points)


@dataclasses.dataclass
class Claim:
    """A notification this run owns until it marks or releases it."""

    row_id: int
    token: str
    rule: Rule
    message_id: str
    attempts: int
    recipient: Recipient


def _insert_ignoring_conflicts(dialect: str) -> Any:
    # Each dialect module is imported only when its database is in use,
    # because the PostgreSQL one alone takes about 20 ms.
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(sn).on_conflict_do_nothing()
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(sn).on_conflict_do_nothing()
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        return mysql.insert(sn).prefix_with("IGNORE")
    return None


def _with_retries(engine: sa.Engine, work: Any) -> Any:
    """Run `work(connection)` in a transaction, retrying a lost deadlock.

    PostgreSQL and MariaDB may abort one of several concurrent claims with a
    deadlock or serialization error. The aborted claim wrote nothing, so it
    is safe to repeat. SQLite waits on its busy timeout instead.
    """
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        try:
            with engine.begin() as connection:
                return work(connection)
        except sa.exc.OperationalError as exc:
            if engine.dialect.name == "sqlite" or attempt == CLAIM_ATTEMPTS or not _is_lock_conflict(exc):
                raise
            log.debug("Claim hit a lock conflict (%s); retrying, attempt %d", exc.orig, attempt)
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def _is_lock_conflict(exc: sa.exc.OperationalError) -> bool:
    args = getattr(exc.orig, "args", None) or (None,)
    code = getattr(exc.orig, "sqlstate", None) or args[0]
    # 40001 serialization failure, 40P01 deadlock (PostgreSQL);
    # 1213 deadlock, 1205 lock wait timeout (MySQL and MariaDB).
    return code in ("40001", "40P01", 1213, 1205)


def claim_new(
    engine: sa.Engine,
    rule: Rule,
    recipients: Sequence[Recipient],
    *,
    token: str,
    now: datetime,
    message_ids: Sequence[str],
) -> list[Claim]:
    """Insert a pending row for each recipient and commit, before any mail leaves.

    A recipient that another run claimed first is left out of the result.
    """
    if not recipients:
        return []
    rows = [
        {
            "rule": rule.name,
            "user_id": recipient.user_id,
            "email": recipient.email,
            "status": "pending",
            "attempts": 0,
            "message_id": message_id,
            "claim_token": token,
            "claimed_at": now,
            "created_at": now,
        }
        for recipient, message_id in zip(recipients, message_ids, strict=True)
    ]

    def insert(connection: sa.Connection) -> list[Any]:
        statement = _insert_ignoring_conflicts(connection.dialect.name)
        if statement is not None:
            connection.execute(statement, rows)
        else:
            # NOTE: dialects other than SQLite, PostgreSQL and MySQL get one
            # savepoint per row; correct but slower, and untested here.
            for row in rows:
                try:
                    with connection.begin_nested():
                        connection.execute(sn.insert(), row)
                except sa.exc.IntegrityError:
                    pass
        query = sa.select(sn.c.id, sn.c.user_id, sn.c.message_id).where(
            sn.c.claim_token == token, sn.c.rule == rule.name
        )
        return list(connection.execute(query).all())

    owned = {row.user_id: row for row in _with_retries(engine, insert)}
    claims = []
    for recipient in recipients:
        row = owned.get(recipient.user_id)
        if row is not None:
            claims.append(Claim(row.id, token, rule, row.message_id, 0, recipient))
    return claims


def retryable_condition(rule: Rule, now: datetime, lease: float) -> sa.ColumnElement[bool]:
    """Build the condition for pending rows that no run owns.

    Those are rows released after a transient error, and rows whose claim
    outlived --lease because its run crashed.
    """
    expired = now - timedelta(seconds=lease)
    return sa.and_(
        sn.c.rule == rule.name,
        sn.c.status == "pending",
        sa.or_(sn.c.claim_token.is_(None), sn.c.claimed_at < expired),
        sa.or_(sn.c.next_attempt_at.is_(None), sn.c.next_attempt_at <= now),
    )


def claim_retryable(
    engine: sa.Engine,
    rule: Rule,
    *,
    token: str,
    now: datetime,
    lease: float,
    limit: int,
) -> list[tuple[int, str, str, str, int]]:
    """Take over up to `limit` retryable rows; return (id, user_id, email, message_id, attempts) of each.

    The UPDATE repeats the retryable condition, so a row that another run
    took between the SELECT and the UPDATE is not taken twice.
    """

    def take(connection: sa.Connection) -> list[Any]:
        condition = retryable_condition(rule, now, lease)
        ids = connection.execute(sa.select(sn.c.id).where(condition).order_by(sn.c.id).limit(limit)).scalars().all()
        if not ids:
            return []
        connection.execute(sn.update().where(sn.c.id.in_(ids), condition).values(claim_token=token, claimed_at=now))
        query = sa.select(sn.c.id, sn.c.user_id, sn.c.email, sn.c.message_id, sn.c.attempts).where(
            sn.c.claim_token == token, sn.c.id.in_(ids)
        )
        return list(connection.execute(query).all())

    return [tuple(row) for row in _with_retries(engine, take)]


def coerce_ids(users: UsersTable, user_ids: Sequence[str]) -> list[Any]:
    """Convert stored text ids back to the users table's id type, so its index is used."""
    try:
        python_type = users.id.type.python_type
    except NotImplementedError:
        return list(user_ids)
    if python_type is int:
        converted = []
        for user_id in user_ids:
            try:
                converted.append(int(user_id))
            except ValueError:
                continue
        return converted
    return list(user_ids)


def fetch_users_by_id(connection: sa.Connection, users: UsersTable, user_ids: Sequence[str]) -> dict[str, Candidate]:
    """Read the current rows of these users, keyed by text id; deleted users are absent."""
    keys = coerce_ids(users, user_ids)
    if not keys:
        return {}
    name = users.name if users.name is not None else sa.null()
    rows = connection.execute(sa.select(users.id, users.email, users.points, name).where(users.id.in_(keys))).all()
    return {str(row[0]): Candidate(row[0], str(row[0]), row[1], row[2], row[3]) for row in rows}


def mark_sent(bind: sa.Engine | sa.Connection, claim: Claim, now: datetime) -> bool:
    """Record that the server accepted the message; return False if the claim was lost.

    `bind` may be a connection that the caller keeps open for its marks; the
    mark is committed before this returns either way.
    """
    if isinstance(bind, sa.Connection) and bind.dialect.name == "sqlite":
        return _claim_kept(_mark_sent_sqlite(bind, claim, now), claim)
    values = {
        "status": "sent",
        "sent_at": now,
        "attempts": claim.attempts + 1,
        "email": claim.recipient.email,
        "claim_token": None,
        "last_error": None,
        "next_attempt_at": None,
    }
    return _update_claimed(bind, claim, values)


# The sent mark of mark_sent() as plain SQLite SQL. It runs once per
# accepted message, and through SQLAlchemy's statement execution it cost
# about as much as the UPDATE and commit themselves. The columns and the
# claim-token condition are those of the generic path.
_SQLITE_MARK_SENT = (
    "UPDATE sent_notifications SET status = 'sent', sent_at = ?, attempts = ?, email = ?, "
    "claim_token = NULL, last_error = NULL, next_attempt_at = NULL "
    "WHERE id = ? AND claim_token = ?"
)


def _mark_sent_sqlite(connection: sa.Connection, claim: Claim, now: datetime) -> bool:
    """Run _SQLITE_MARK_SENT on the DBAPI connection and commit; return whether the claim was still ours."""
    raw = cast(sqlite3.Connection, connection.connection.dbapi_connection)
    # The text form SQLAlchemy's SQLite DateTime type writes and reads back.
    sent_at = now.strftime("%Y-%m-%d %H:%M:%S.%f")
    parameters = (sent_at, claim.attempts + 1, claim.recipient.email, claim.row_id, claim.token)
    cursor = raw.cursor()
    try:
        cursor.execute(_SQLITE_MARK_SENT, parameters)
        updated = cursor.rowcount == 1
        raw.commit()
    except sqlite3.Error as exc:
        raw.rollback()
        # The run handles SQLAlchemy's errors, which wrap the driver's.
        raise sa.exc.OperationalError(_SQLITE_MARK_SENT, parameters, exc) from exc
    finally:
        cursor.close()
    return updated


def mark_failed(engine: sa.Engine, claim: Claim, error: str, *, attempted: bool = True) -> bool:
    """Record a permanent failure; the row is not retried unless an operator resets it."""
    values = {
        "status": "failed",
        "attempts": claim.attempts + (1 if attempted else 0),
        "email": claim.recipient.email,
        "last_error": error[:2000],
        "claim_token": None,
        "next_attempt_at": None,
    }
    return _update_claimed(engine, claim, values)


def mark_transient(
    engine: sa.Engine,
    claim: Claim,
    now: datetime,
    error: str,
    *,
    max_attempts: int,
    backoff: float,
) -> str:
    """Release the claim for a later retry after `backoff * 2**(attempts - 1)` seconds.

    After `max_attempts` attempts the row is marked failed instead. Returns
    the new status: "pending" or "failed".
    """
    attempts = claim.attempts + 1
    if attempts >= max_attempts:
        mark_failed(engine, claim, f"gave up after {attempts} attempts; last error: {error}")
        return "failed"
    delay = backoff * 2 ** (attempts - 1)
    values = {
        "attempts": attempts,
        "last_error": error[:2000],
        "claim_token": None,
        "claimed_at": None,
        "next_attempt_at": now + timedelta(seconds=delay),
    }
    _update_claimed(engine, claim, values)
    return "pending"


def count_waiting(engine: sa.Engine, rules: Sequence[Rule], now: datetime) -> int:
    """Count the released pending rows of these rules whose next attempt is still in the future."""
    query = (
        sa.select(sa.func.count())
        .select_from(sn)
        .where(
            sn.c.rule.in_([rule.name for rule in rules]),
            sn.c.status == "pending",
            sn.c.claim_token.is_(None),
            sn.c.next_attempt_at > now,
        )
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def release(engine: sa.Engine, token: str) -> int:
    """Give back every pending claim of this token; return how many."""
    with engine.begin() as connection:
        result = connection.execute(
            sn.update()
            .where(sn.c.claim_token == token, sn.c.status == "pending")
            .values(claim_token=None, claimed_at=None)
        )
    return int(result.rowcount)


def refresh_claims(engine: sa.Engine, token: str, now: datetime) -> None:
    """Extend the lease on every row this run still holds."""
    with engine.begin() as connection:
        connection.execute(
            sn.update().where(sn.c.claim_token == token, sn.c.status == "pending").values(claimed_at=now)
        )


@functools.lru_cache(maxsize=16)
def _claimed_update(columns: tuple[str, ...]) -> sa.Update:
    """Build, once per set of columns, the UPDATE of a row that still carries its claim token.

    Building a statement and its cache key costs about as much as the
    commit itself on SQLite in WAL mode, and marks run once per message.
    """
    return (
        sn.update()
        .where(sn.c.id == sa.bindparam("claimed_row_id"), sn.c.claim_token == sa.bindparam("claimed_token"))
        .values({column: sa.bindparam(f"new_{column}") for column in columns})
    )


def _update_claimed(bind: sa.Engine | sa.Connection, claim: Claim, values: dict[str, Any]) -> bool:
    parameters = {f"new_{column}": value for column, value in values.items()}
    parameters.update(claimed_row_id=claim.row_id, claimed_token=claim.token)
    statement = _claimed_update(tuple(values))
    if isinstance(bind, sa.Connection):
        with bind.begin():
            result = bind.execute(statement, parameters)
    else:
        with bind.begin() as connection:
            result = connection.execute(statement, parameters)
    return _claim_kept(result.rowcount == 1, claim)


def _claim_kept(updated: bool, claim: Claim) -> bool:
    if updated:
        return True
    log.warning(
        "Lost the claim on user %s (rule %s) before recording it: its lease ran out and another run may have taken it. "
        "Raise --lease if sending one batch can take longer.",
        claim.recipient.user_id,
        claim.rule.name,
    )
    return False
