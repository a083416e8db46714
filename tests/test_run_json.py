"""`poller run --json` prints one JSON object on stdout, also when the run fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from poller.lock import RunLock
from tests.conftest import SMTPServer, create_users, upgrade

SUCCESS_KEYS = {
    "eligible",
    "sent",
    "failed",
    "deferred",
    "skipped",
    "claimed_elsewhere",
    "waiting_retry",
    "released",
    "dry_run",
    "duration_seconds",
}


@pytest.fixture
def users_db(sqlite_url: str) -> str:
    """A SQLite database with two due users and no sent_notifications table yet."""
    create_users(
        sqlite_url,
        [
            {"id": 1, "email": "ada@example.com", "points": 150},
            {"id": 2, "email": "bob@example.com", "points": 300},
        ],
    )
    return sqlite_url


def run_json(invoke: Any, database_url: str, mail_url: str, *extra: str) -> Any:
    return invoke("run", "--json", "--database-url", database_url, "--mail-url", mail_url, *extra)


def assert_failure_object(stdout: str, exit_code: int, error: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stdout)
    assert set(data) >= SUCCESS_KEYS
    assert data["exit_code"] == exit_code
    assert error in data["error"]
    return data


def test_json_on_configuration_error(invoke: Any, users_db: str, smtp_server: SMTPServer) -> None:
    result = run_json(invoke, users_db, smtp_server.url, "--threshold", "-5")

    assert result.exit_code == 2
    data = assert_failure_object(result.stdout, 2, "--threshold")
    assert data["sent"] == 0
    assert data["dry_run"] is False
    assert "Error: " in result.stderr


def test_json_on_missing_column(invoke: Any, users_db: str, smtp_server: SMTPServer) -> None:
    upgrade(users_db)

    result = run_json(invoke, users_db, smtp_server.url, "--points-column", "score")

    assert result.exit_code == 2
    assert_failure_object(result.stdout, 2, "--points-column")


def test_json_on_unmigrated_database(invoke: Any, users_db: str, smtp_server: SMTPServer) -> None:
    result = run_json(invoke, users_db, smtp_server.url)

    assert result.exit_code == 1
    data = assert_failure_object(result.stdout, 1, "poller db upgrade")
    assert data["eligible"] == 0


def test_json_on_missing_database_file(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    result = run_json(invoke, f"sqlite:///{tmp_path / 'missing.db'}", smtp_server.url)

    assert result.exit_code == 1
    assert_failure_object(result.stdout, 1, "does not exist")


def test_json_on_busy_lock(invoke: Any, users_db: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    upgrade(users_db)
    lock_path = tmp_path / "held.lock"

    with RunLock(lock_path):
        result = run_json(invoke, users_db, smtp_server.url, "--lock-file", str(lock_path))

    assert result.exit_code == 75
    assert_failure_object(result.stdout, 75, "Another poller run")
    assert smtp_server.sink.received == []


def test_json_on_dry_run_error(invoke: Any, users_db: str) -> None:
    result = invoke("run", "--json", "--dry-run", "--database-url", users_db, "--threshold", "0")

    assert result.exit_code == 2
    data = assert_failure_object(result.stdout, 2, "--threshold")
    assert data["dry_run"] is True


def test_json_on_run_stopped_by_mail_setup(invoke: Any, users_db: str, smtp_server: SMTPServer) -> None:
    upgrade(users_db)

    result = run_json(invoke, users_db, f"smtp+starttls://127.0.0.1:{smtp_server.port}")

    assert result.exit_code == 1
    data = assert_failure_object(result.stdout, 1, "STARTTLS")
    assert data["eligible"] == 2
    assert data["sent"] == 0


def test_json_of_successful_run_unchanged(invoke: Any, users_db: str, smtp_server: SMTPServer) -> None:
    upgrade(users_db)

    result = run_json(invoke, users_db, smtp_server.url)

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == SUCCESS_KEYS
    assert data["sent"] == 2
