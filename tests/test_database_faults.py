"""`poller run` when the database is unreachable, drops the connection mid-run, or lacks a column."""

from __future__ import annotations

import os
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SMTPServer, create_users, free_port, reset_database, upgrade
from tests.test_smtp_faults import rows_by_user, run_args


def test_unreachable_database_is_one_line(invoke: Any, smtp_server: SMTPServer) -> None:
    url = f"postgresql+psycopg://poller:Hidden-Pa55@127.0.0.1:{free_port()}/game"

    result = invoke(*run_args(url, smtp_server.url))

    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "127.0.0.1" in errors[0]
    assert "Hidden-Pa55" not in result.stderr
    assert "Traceback" not in result.stderr
    assert smtp_server.sink.received == []


@pytest.mark.parametrize("option", ["--id-column", "--email-column", "--points-column", "--name-column"])
def test_missing_column_is_usage_error(invoke: Any, app_db: str, smtp_server: SMTPServer, option: str) -> None:
    result = invoke(*run_args(app_db, smtp_server.url, option, "score"))

    assert result.exit_code == 2
    assert "no column 'score'" in result.stderr
    assert option in result.stderr
    assert smtp_server.sink.received == []


def test_missing_users_table_is_usage_error(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server.url, "--users-table", "players"))

    assert result.exit_code == 2
    assert "'players' not found" in result.stderr
    assert "--users-table" in result.stderr
    assert smtp_server.sink.received == []


def test_missing_column_in_dry_run_is_usage_error(invoke: Any, app_db: str) -> None:
    result = invoke("run", "--dry-run", "--database-url", app_db, "--points-column", "score")

    assert result.exit_code == 2
    assert "--points-column" in result.stderr


def test_postgresql_connections_killed_mid_run(invoke: Any, smtp_server: SMTPServer, server_databases: Any) -> None:
    base = server_databases.get("postgresql")
    if base is None:
        pytest.skip("POLLER_TEST_POSTGRESQL_URL is not set")
    reset_database(base)
    create_users(base, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, 11)])
    upgrade(base)
    tag = f"poller-test-{os.getpid()}"
    url = f"{base}?application_name={tag}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    sink = smtp_server.sink
    original = sink.handle_DATA
    seen = {"count": 0, "terminated": 0}

    async def handle_data(server: Any, session: Any, envelope: Any) -> str:
        # Terminate poller's own backends (and only those) at every third message.
        seen["count"] += 1
        if seen["count"] % 3 == 0:
            with admin.connect() as connection:
                killed = connection.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %(tag)s",
                    {"tag": tag},
                ).all()
            seen["terminated"] += len(killed)
        return await original(server, session, envelope)

    sink.handle_DATA = handle_data  # type: ignore[method-assign]
    try:
        result = invoke(*run_args(url, smtp_server.url, "--json"))
    finally:
        admin.dispose()

    # Either the pool's pre-ping recovers, or the run stops with a clear
    # error; in both cases the records match what the server accepted.
    assert "Traceback" not in result.stderr
    rows = rows_by_user(base)
    sent = sorted(row["email"] for row in rows.values() if row["status"] == "sent")
    assert set(sent) <= set(sink.recipients())
    assert seen["terminated"] > 0
    assert result.exit_code == 0, result.output
    assert len(sent) == 10


def test_mariadb_wait_timeout_shorter_than_send(invoke: Any, smtp_server: SMTPServer, server_databases: Any) -> None:
    base = server_databases.get("mysql")
    if base is None:
        pytest.skip("POLLER_TEST_MYSQL_URL is not set")
    reset_database(base)
    create_users(base, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, 4)])
    upgrade(base)
    # Only poller's sessions get the short timeout, through PyMySQL's init_command.
    url = f"{base}?init_command=SET+SESSION+wait_timeout%3D1"
    sink = smtp_server.sink
    original = sink.handle_DATA

    async def slow_data(server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        await asyncio.sleep(2)
        return await original(server, session, envelope)

    sink.handle_DATA = slow_data  # type: ignore[method-assign]

    result = invoke(*run_args(url, smtp_server.url, "--json"))

    assert "Traceback" not in result.stderr
    rows = rows_by_user(base)
    sent = sorted(row["email"] for row in rows.values() if row["status"] == "sent")
    assert set(sent) <= set(sink.recipients())
    assert result.exit_code == 0, result.output
    assert len(sent) == 3
