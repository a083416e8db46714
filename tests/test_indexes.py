"""The recommendation of an index on the users table's points column."""

from __future__ import annotations

import sqlalchemy as sa

from poller import db, indexes
from poller.settings import load_settings
from tests.conftest import create_users


def warning_for(url: str) -> str | None:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        users = db.reflect_users(connection, load_settings({}, environ={}))
        warning = indexes.points_index_warning(connection, users)
    engine.dispose()
    return warning


def test_points_index_missing_is_reported(database_url: str) -> None:
    create_users(database_url, [])

    warning = warning_for(database_url)

    assert warning is not None
    assert "CREATE INDEX ix_users_points ON users (points);" in warning


def test_points_index_present_is_accepted(database_url: str) -> None:
    create_users(database_url, [])
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE INDEX ix_points_first ON users (points, id)")
    engine.dispose()

    assert warning_for(database_url) is None


def test_index_with_points_second_is_not_enough(database_url: str) -> None:
    create_users(database_url, [])
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE INDEX ix_email_points ON users (email, points)")
    engine.dispose()

    assert warning_for(database_url) is not None
