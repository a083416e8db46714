"""Bad and changing rows in the users table: each has a defined outcome, and none stops the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SMTPServer, create_users, notifications, upgrade
from tests.test_smtp_faults import move_retries_due, rows_by_user, run_args


def execute(url: str, statement: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(statement)
    engine.dispose()


def test_sqlite_text_in_integer_points_column(invoke: Any, sqlite_url: str, smtp_server: SMTPServer) -> None:
    create_users(sqlite_url, [{"id": n, "email": f"u{n}@example.com", "points": 0} for n in range(1, 5)])
    # SQLite stores text that does not look like a number as text, even in an INTEGER column.
    execute(sqlite_url, "UPDATE users SET points = 'abc' WHERE id = 1")
    execute(sqlite_url, "UPDATE users SET points = '150' WHERE id = 2")
    execute(sqlite_url, "UPDATE users SET points = 99 WHERE id = 3")
    execute(sqlite_url, "UPDATE users SET points = 100 WHERE id = 4")
    upgrade(sqlite_url)

    result = invoke(*run_args(sqlite_url, smtp_server.url, "--json"))

    assert result.exit_code == 0, result.output
    assert sorted(smtp_server.sink.recipients()) == ["u2@example.com", "u4@example.com"]
    counts = json.loads(result.stdout)
    assert counts["skipped"] == 1
    assert "Skipping user 1 " in result.stderr


def test_sqlite_numbers_as_text_compare_numerically(invoke: Any, sqlite_url: str, smtp_server: SMTPServer) -> None:
    points = {1: "150", 2: "99", 3: "1e3", 4: " 120 ", 5: "abc", 6: "100.0", 7: "1000", 8: "", 9: None}
    create_users(
        sqlite_url,
        [{"id": n, "email": f"u{n}@example.com", "points": value} for n, value in points.items()],
        points_type=sa.Text,
    )
    upgrade(sqlite_url)

    result = invoke(*run_args(sqlite_url, smtp_server.url, "--json"))

    assert result.exit_code == 0, result.output
    expected = ["u1@example.com", "u3@example.com", "u4@example.com", "u6@example.com", "u7@example.com"]
    assert sorted(smtp_server.sink.recipients()) == expected
    counts = json.loads(result.stdout)
    assert counts["skipped"] == 2  # 'abc' and the empty string; NULL is never due
    assert counts["sent"] == 5


def test_odd_rows_have_defined_outcomes(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    create_users(
        database_url,
        [
            {"id": 1, "email": "null-points@example.com", "points": None},
            {"id": 2, "email": "long@example.com", "points": 500, "name": "x" * 10_000},
            {"id": 3, "email": "zoë@bücher.example", "points": 500, "name": "Zoë"},
            {"id": 4, "email": "ünïcode@example.com", "points": 500},
            {"id": 5, "email": "shared@example.com", "points": 500, "name": "First"},
            {"id": 6, "email": "shared@example.com", "points": 500, "name": "Second"},
            {"id": 7, "email": "  padded@example.com  ", "points": 500},
            {"id": 8, "email": "ok@bücher.example", "points": 500, "name": "Jürgen\r\nBcc: a@b.org"},
        ],
    )
    upgrade(database_url)

    result = invoke(*run_args(database_url, smtp_server.url, "--json"))

    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["sent"] == 5
    assert counts["skipped"] == 2
    assert "Skipping user 3 " in result.stderr
    assert "Skipping user 4 " in result.stderr
    assert sorted(smtp_server.sink.recipients()) == [
        "long@example.com",
        "ok@xn--bcher-kva.example",
        "padded@example.com",
        "shared@example.com",
        "shared@example.com",
    ]
    by_name = {item.message["To"].addresses[0].display_name: item for item in smtp_server.sink.received}
    assert "First" in by_name
    assert "Second" in by_name
    long_name = next(name for name in by_name if name.startswith("x"))
    assert len(long_name.replace(" ", "")) == 200
    assert "Jürgen Bcc: a@b.org" in by_name
    assert by_name["Jürgen Bcc: a@b.org"].recipients == ["ok@xn--bcher-kva.example"]
    assert sorted(row["user_id"] for row in notifications(database_url)) == ["2", "5", "6", "7", "8"]


def test_user_changed_after_selection(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sink = smtp_server.sink
    original = sink.handle_RCPT
    changed = {"done": False}

    async def handle_rcpt(server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if not changed["done"]:
            changed["done"] = True
            execute(app_db, "DELETE FROM users WHERE id = 3")
            execute(app_db, "UPDATE users SET email = 'dee.new@example.com' WHERE id = 4")
        return await original(server, session, envelope, address, options)

    sink.handle_RCPT = handle_rcpt  # type: ignore[method-assign]

    result = invoke(*run_args(app_db, smtp_server.url))

    # Users claimed in this run get the address read when they were selected.
    assert result.exit_code == 0, result.output
    assert sorted(sink.recipients()) == ["ada@example.com", "cy@example.com", "dee@example.com"]
    rows = rows_by_user(app_db)
    assert rows["3"]["status"] == "sent"
    assert rows["4"]["email"] == "dee@example.com"


@pytest.mark.parametrize("change", ["delete", "new address", "address made invalid"])
def test_user_changed_before_retry(invoke: Any, app_db: str, smtp_server: SMTPServer, change: str) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "451 4.3.0 Try later"
    first = invoke(*run_args(app_db, smtp_server.url))
    assert first.exit_code == 1
    del smtp_server.sink.rcpt_replies["cy@example.com"]
    statement = {
        "delete": "DELETE FROM users WHERE id = 3",
        "new address": "UPDATE users SET email = 'cy.new@example.com' WHERE id = 3",
        "address made invalid": "UPDATE users SET email = 'not-an-address' WHERE id = 3",
    }[change]
    execute(app_db, statement)
    move_retries_due(app_db)

    result = invoke(*run_args(app_db, smtp_server.url))

    row = rows_by_user(app_db)["3"]
    if change == "new address":
        assert result.exit_code == 0, result.output
        assert row["status"] == "sent"
        assert row["email"] == "cy.new@example.com"
        assert smtp_server.sink.recipients()[-1] == "cy.new@example.com"
    else:
        assert result.exit_code == 1
        assert row["status"] == "failed"
        assert row["last_error"].startswith("not retried: ")
        assert "cy@example.com" not in smtp_server.sink.recipients()
