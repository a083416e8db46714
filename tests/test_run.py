"""`poller run` against real databases and a real SMTP server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import SMTPServer, create_users, notifications, poller_executable, subprocess_env, upgrade


def run_args(database_url: str, smtp: SMTPServer, *extra: str) -> list[str]:
    return ["run", "--database-url", database_url, "--mail-url", smtp.url, "--from", "Game <game@example.com>", *extra]


def test_run_sends_to_due_users(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server, "--json"))

    assert result.exit_code == 0, result.output
    assert sorted(smtp_server.sink.recipients()) == ["ada@example.com", "cy@example.com", "dee@example.com"]
    counts = json.loads(result.stdout)
    assert counts["eligible"] == 3
    assert counts["sent"] == 3
    assert counts["failed"] == 0
    assert counts["skipped"] == 0
    assert counts["dry_run"] is False
    assert counts["duration_seconds"] >= 0
    rows = notifications(app_db)
    assert {row["status"] for row in rows} == {"sent"}
    assert all(row["sent_at"] is not None for row in rows)


def test_rerun_sends_nothing(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    first = invoke(*run_args(app_db, smtp_server))
    second = invoke(*run_args(app_db, smtp_server, "--json"))

    assert first.exit_code == 0
    assert second.exit_code == 0
    assert len(smtp_server.sink.received) == 3
    assert json.loads(second.stdout)["sent"] == 0


def test_newly_due_user_is_sent_on_next_run(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))
    engine = sa.create_engine(app_db)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE users SET points = 120 WHERE id = 2")
    engine.dispose()

    result = invoke(*run_args(app_db, smtp_server))

    assert result.exit_code == 0
    assert smtp_server.sink.recipients()[-1] == "bob@example.com"
    assert len(smtp_server.sink.received) == 4


def test_message_headers(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))

    by_address = {item.recipients[0]: item for item in smtp_server.sink.received}
    message = by_address["ada@example.com"].message
    assert message["To"] == "Ada <ada@example.com>"
    assert message["From"] == "Game <game@example.com>"
    assert message["Subject"] == "Congratulations, you reached 100 points!"
    assert message["Date"] is not None
    assert by_address["ada@example.com"].sender == "game@example.com"
    assert "you now have 150 points" in message.get_content()
    row = next(row for row in notifications(app_db) if row["user_id"] == "1")
    assert message["Message-ID"] == row["message_id"]


def test_non_ascii_name_is_encoded(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    create_users(database_url, [{"id": 1, "email": "zoe@example.com", "points": 500, "name": "Zoë Ødegård 山田"}])
    upgrade(database_url)

    result = invoke(*run_args(database_url, smtp_server))

    assert result.exit_code == 0
    raw = smtp_server.sink.received[0].data
    assert raw.isascii() or b"=?utf-8?" in raw.split(b"\r\n\r\n")[0]
    headers = raw.split(b"\r\n\r\n")[0]
    assert headers.isascii()
    message = smtp_server.sink.received[0].message
    assert message["To"].addresses[0].display_name == "Zoë Ødegård 山田"
    assert "Hello Zoë Ødegård 山田," in message.get_content()


def test_crlf_in_name_adds_no_header(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    evil = "Mallory\r\nBcc: victim@example.org\r\nSubject: pwned"
    create_users(database_url, [{"id": 1, "email": "mal@example.com", "points": 500, "name": evil}])
    upgrade(database_url)

    result = invoke(*run_args(database_url, smtp_server))

    assert result.exit_code == 0
    received = smtp_server.sink.received
    assert len(received) == 1
    assert received[0].recipients == ["mal@example.com"]
    message = received[0].message
    assert message["Bcc"] is None
    assert message.get_all("Subject") == ["Congratulations, you reached 100 points!"]
    assert message["To"].addresses[0].display_name == "Mallory Bcc: victim@example.org Subject: pwned"


def test_bad_emails_are_skipped_and_counted(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    create_users(
        database_url,
        [
            {"id": 1, "email": None, "points": 500},
            {"id": 2, "email": "", "points": 500},
            {"id": 3, "email": "not-an-address", "points": 500},
            {"id": 4, "email": "two@@example.com", "points": 500},
            {"id": 5, "email": "ok@example.com", "points": 500},
            {"id": 6, "email": "a@b.com\r\nBcc: x@evil.org", "points": 500},
        ],
    )
    upgrade(database_url)

    result = invoke(*run_args(database_url, smtp_server, "--json"))

    assert result.exit_code == 0
    assert smtp_server.sink.recipients() == ["ok@example.com"]
    counts = json.loads(result.stdout)
    assert counts["skipped"] == 5
    assert counts["sent"] == 1
    for user_id in ("1", "2", "3", "4", "6"):
        assert f"Skipping user {user_id} " in result.stderr
    # Skipped rows are not recorded, so fixing the address makes them due.
    assert [row["user_id"] for row in notifications(database_url)] == ["5"]


def test_permanent_refusal_does_not_stop_others(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "550 5.1.1 No such mailbox"

    result = invoke(*run_args(app_db, smtp_server, "--json"))

    assert result.exit_code == 1
    assert sorted(smtp_server.sink.recipients()) == ["ada@example.com", "dee@example.com"]
    counts = json.loads(result.stdout)
    assert counts["sent"] == 2
    assert counts["failed"] == 1
    failed = [row for row in notifications(app_db) if row["status"] == "failed"]
    assert [row["user_id"] for row in failed] == ["3"]
    assert failed[0]["last_error"] == "550 5.1.1 No such mailbox"

    rerun = invoke(*run_args(app_db, smtp_server))
    assert rerun.exit_code == 0
    assert len(smtp_server.sink.received) == 2


def test_missing_table_hints_upgrade(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    create_users(database_url, [{"id": 1, "email": "a@example.com", "points": 500}])

    result = invoke(*run_args(database_url, smtp_server))

    assert result.exit_code == 1
    assert "poller db upgrade" in result.stderr
    assert smtp_server.sink.received == []


def test_dry_run_writes_and_sends_nothing(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server, "--dry-run"))

    assert result.exit_code == 0
    assert "would notify user 1 <ada@example.com>" in result.stdout
    assert "would notify user 2 " not in result.stdout
    assert smtp_server.sink.received == []
    assert notifications(app_db) == []


def test_dry_run_json_lists_recipients(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server, "--dry-run", "--json"))

    data = json.loads(result.stdout)
    assert data["dry_run"] is True
    assert sorted(item["email"] for item in data["would_send"]) == [
        "ada@example.com",
        "cy@example.com",
        "dee@example.com",
    ]


def test_limit_caps_one_run(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    first = invoke(*run_args(app_db, smtp_server, "--limit", "2"))
    assert first.exit_code == 0
    assert len(smtp_server.sink.received) == 2

    second = invoke(*run_args(app_db, smtp_server, "--limit", "2"))
    assert second.exit_code == 0
    assert len(smtp_server.sink.received) == 3
    assert len(set(smtp_server.sink.recipients())) == 3


def test_secret_stays_out_of_output(invoke: Any, tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    url = f"postgresql+psycopg://poller:{secret}@127.0.0.1:1/nothing"

    result = invoke(
        "run", "--database-url", url, "--mail-url", "console:", "--json", env={"POLLER_SMTP_PASSWORD": secret}
    )

    assert result.exit_code == 1
    assert secret not in result.output
    assert secret not in result.stderr
    assert "poller:***@127.0.0.1" in result.stderr


def test_quiet_prints_nothing_on_success(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server, "--quiet"))

    assert result.exit_code == 0
    assert result.output == ""
    assert result.stderr == ""


def test_installed_script_end_to_end(tmp_path: Path, smtp_server: SMTPServer) -> None:
    database = tmp_path / "app.db"
    url = f"sqlite:///{database}"
    create_users(url, [{"id": n, "email": f"u{n}@example.com", "points": 50 * n} for n in range(1, 7)])
    env = subprocess_env(tmp_path, POLLER_DATABASE_URL=url, POLLER_MAIL_URL=smtp_server.url)
    poller = poller_executable()

    migrated = subprocess.run([poller, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    first = subprocess.run([poller, "run", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["sent"] == 5
    second = subprocess.run([poller, "run", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["sent"] == 0

    assert sorted(smtp_server.sink.recipients()) == [f"u{n}@example.com" for n in range(2, 7)]


def test_thousands_of_users_each_get_one(invoke: Any, sqlite_url: str, smtp_server: SMTPServer) -> None:
    rows = [
        {"id": n, "email": f"player{n}@example.com", "points": n % 300, "name": f"Player {n}"} for n in range(1, 3001)
    ]
    create_users(sqlite_url, rows)
    upgrade(sqlite_url)
    expected = sorted(row["email"] for row in rows if row["points"] >= 100)

    first = invoke(*run_args(sqlite_url, smtp_server, "--json"))
    second = invoke(*run_args(sqlite_url, smtp_server, "--json"))

    assert first.exit_code == 0
    assert second.exit_code == 0
    assert sorted(smtp_server.sink.recipients()) == expected
    assert json.loads(first.stdout)["sent"] == len(expected)
    assert json.loads(second.stdout)["sent"] == 0


def test_refusal_log_names_retry_command(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "550 5.1.1 No such mailbox"

    result = invoke(*run_args(app_db, smtp_server))

    assert result.exit_code == 1
    assert "`poller retry --failed --user 3`" in result.stderr


def test_deferred_user_counted_while_waiting(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "451 4.3.0 Try again later"
    first = invoke(*run_args(app_db, smtp_server, "--json"))
    del smtp_server.sink.rcpt_replies["cy@example.com"]

    second = invoke(*run_args(app_db, smtp_server, "--json"))

    assert first.exit_code == 1
    assert json.loads(first.stdout)["deferred"] == 1
    assert json.loads(first.stdout)["waiting_retry"] == 0
    assert second.exit_code == 0
    counts = json.loads(second.stdout)
    assert counts["sent"] == 0
    assert counts["waiting_retry"] == 1
    assert "waiting for a retry 1" in second.stderr


def test_dry_run_shows_retry_at_current_address(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "550 5.1.1 No such mailbox"
    invoke(*run_args(app_db, smtp_server))
    engine = sa.create_engine(app_db)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE users SET email = 'cy.new@example.com' WHERE id = 3")
    engine.dispose()
    retried = invoke("retry", "--failed", "--database-url", app_db)

    preview = invoke(*run_args(app_db, smtp_server, "--dry-run", "--json"))

    assert retried.exit_code == 0
    would_send = json.loads(preview.stdout)["would_send"]
    assert [(item["user_id"], item["email"], item["retry"]) for item in would_send] == [
        ("3", "cy.new@example.com", True)
    ]
