"""Create a users table of N rows with a chosen share eligible and already notified.

User i (from 1) has the address user{i}@example.com. Every k-th user is
eligible (points at or above the threshold of 100), spread evenly over the
ids, and the first `notified` eligible users already have a `sent` row in
sent_notifications, as after an earlier run. poller's own migrations create
sent_notifications, so the benchmark uses the schema poller uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa

from poller import migrate

THRESHOLD = 100
RULE = "points-100"
CHUNK = 50_000


def address(user_id: int) -> str:
    return f"user{user_id}@example.com"


def eligible_ids(users: int, eligible: int) -> list[int]:
    """Return `eligible` ids spread evenly over 1..users."""
    if eligible <= 0:
        return []
    step = users / eligible
    return [int(index * step) + 1 for index in range(eligible)]


def _user_rows(users: int, eligible: set[int]) -> Iterator[dict[str, object]]:
    for user_id in range(1, users + 1):
        points = THRESHOLD + user_id % 900 if user_id in eligible else user_id % THRESHOLD
        yield {"id": user_id, "email": address(user_id), "points": points, "name": f"User {user_id}"}


def _chunks(rows: Iterator[dict[str, object]]) -> Iterator[list[dict[str, object]]]:
    chunk: list[dict[str, object]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def generate(
    url: str, *, users: int, eligible: int, notified: int = 0, points_index: bool = True, journal_mode: str = "wal"
) -> list[int]:
    """Fill an empty database at `url`; return the ids that are due (eligible, not notified).

    A SQLite file gets `journal_mode`. WAL, the mode recommended for poller,
    makes a durable commit one append to the log instead of creating and
    deleting a rollback journal, which matters at one commit per message.
    """
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql(f"PRAGMA journal_mode={journal_mode}")
    metadata = sa.MetaData()
    table = sa.Table(
        "users",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(320)),
        sa.Column("points", sa.Integer),
        sa.Column("name", sa.Text),
    )
    if points_index:
        sa.Index("ix_users_points", table.c.points)
    metadata.create_all(engine)
    migrate.upgrade(engine)

    chosen = eligible_ids(users, eligible)
    with engine.begin() as connection:
        for chunk in _chunks(_user_rows(users, set(chosen))):
            connection.execute(table.insert(), chunk)

    now = datetime(2024, 1, 1)
    done = chosen[:notified]
    sent = (
        {
            "rule": RULE,
            "user_id": str(user_id),
            "email": address(user_id),
            "status": "sent",
            "attempts": 1,
            "message_id": f"<bench-{user_id}@example.com>",
            "sent_at": now,
            "created_at": now,
        }
        for user_id in done
    )
    notifications = sa.table(
        "sent_notifications",
        *(
            sa.column(name)
            for name in ("rule", "user_id", "email", "status", "attempts", "message_id", "sent_at", "created_at")
        ),
    )
    with engine.begin() as connection:
        for chunk in _chunks(sent):
            connection.execute(notifications.insert(), chunk)
    if engine.dialect.name == "sqlite":
        # Fold the log into the file, as a long-lived database would be,
        # so that the first reader does not map a log of the whole load.
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return chosen[notified:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="SQLAlchemy URL of an empty database, such as sqlite:////tmp/bench/users.db")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--eligible", type=int, default=100_000)
    parser.add_argument("--notified", type=int, default=0, help="How many eligible users already have a sent row.")
    parser.add_argument("--no-points-index", action="store_true", help="Leave users.points without an index.")
    parser.add_argument("--journal-mode", default="wal", help="SQLite journal mode, such as wal or delete.")
    args = parser.parse_args()
    due = generate(
        args.url,
        users=args.users,
        eligible=args.eligible,
        notified=args.notified,
        points_index=not args.no_points_index,
        journal_mode=args.journal_mode,
    )
    print(f"{args.users} users, {args.eligible} eligible, {len(due)} due")


if __name__ == "__main__":
    main()
