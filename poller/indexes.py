"""Indexes that keep the due-users query fast on a large users table.

The due query filters users by points and looks each candidate up in
sent_notifications by (rule, user_id). The second index comes with
poller's own UNIQUE constraint; the first belongs to the other
application's table, which poller never alters, so it can only recommend
it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from poller.db import UsersTable


def points_index_warning(connection: sa.Connection, users: UsersTable) -> str | None:
    """Return a warning when no index starts with the points column, or None when one does."""
    table = users.table
    points = users.points.name
    inspector = sa.inspect(connection)
    indexed: list[Sequence[str | None]] = [
        index["column_names"] for index in inspector.get_indexes(table.name, schema=table.schema)
    ]
    indexed += [unique["column_names"] for unique in inspector.get_unique_constraints(table.name, schema=table.schema)]
    if any(list(columns[:1]) == [points] for columns in indexed):
        return None
    return (
        f"Table {table.fullname!r} has no index on {points!r}, so every run reads the whole table "
        "to find users at the threshold. Create one, for example: "
        f"CREATE INDEX ix_{table.name}_{points} ON {table.fullname} ({points});"
    )
