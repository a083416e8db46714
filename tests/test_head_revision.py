"""The head revision that `poller run` checks without importing Alembic."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from poller import db, migrate
from poller.errors import DatabaseError
from poller.schema import HEAD_REVISION
from tests.conftest import upgrade


def test_head_revision_matches_alembic() -> None:
    assert migrate.head_revision() == HEAD_REVISION


def test_check_migrated_rejects_older_revision(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE poller_alembic_version SET version_num = '0000'")

    with engine.connect() as connection, pytest.raises(DatabaseError) as raised:
        db.check_migrated(connection)
    engine.dispose()

    assert "'0000'" in str(raised.value)
    assert "poller db upgrade" in str(raised.value)
