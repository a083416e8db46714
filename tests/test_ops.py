"""Operator commands against real databases and a real SMTP server."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from poller.store import utcnow
from poller.table import render_table
from tests.conftest import SMTPServer, notifications

FROM = "Game <game@example.com>"


def run_args(database_url: str, smtp: SMTPServer, *extra: str) -> list[str]:
    return ["run", "--database-url", database_url, "--mail-url", smtp.url, "--from", FROM, *extra]


def execute(url: str, sql: str, **params: Any) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(sql), params)
    engine.dispose()


# pending -------------------------------------------------------------------


def test_pending_table_lists_due_users(invoke: Any, app_db: str) -> None:
    result = invoke("pending", "--database-url", app_db)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RULE", "USER", "EMAIL", "NAME", "KIND", "SUBJECT"]
    users = [line.split()[1] for line in lines[1:]]
    assert users == ["1", "3", "4"]
    assert "\x1b[" not in result.stdout


def test_pending_json_matches_dry_run(invoke: Any, app_db: str) -> None:
    pending = invoke("pending", "--database-url", app_db, "--json")
    dry_run = invoke("run", "--database-url", app_db, "--dry-run", "--json", "--mail-url", "console:")

    items = json.loads(pending.stdout)
    expected = json.loads(dry_run.stdout)["would_send"]
    assert [item["user_id"] for item in items] == [item["user_id"] for item in expected]
    assert items[0]["kind"] == "new"
    assert items[0]["subject"] == "Congratulations, you reached 100 points!"


def test_pending_limit_and_writes_nothing(invoke: Any, app_db: str) -> None:
    result = invoke("pending", "--database-url", app_db, "--json", "--limit", "2")

    assert len(json.loads(result.stdout)) == 2
    assert notifications(app_db) == []


def test_pending_lists_retry_after_deferral(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "451 4.3.0 Try later"
    invoke(*run_args(app_db, smtp_server, "--retry-backoff", "0.001"))

    items = json.loads(invoke("pending", "--database-url", app_db, "--json").stdout)

    assert [(item["user_id"], item["kind"]) for item in items] == [("3", "retry")]
    assert items[0]["subject"] == "Congratulations, you reached 100 points!"


# history -------------------------------------------------------------------


def sent_with_one_failure(invoke: Any, app_db: str, smtp: SMTPServer) -> None:
    smtp.sink.rcpt_replies["cy@example.com"] = "550 5.1.1 No such mailbox"
    result = invoke(*run_args(app_db, smtp))
    assert result.exit_code == 1


def test_history_newest_first(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)
    execute(
        app_db, "UPDATE sent_notifications SET created_at = :old WHERE user_id = '4'", old=utcnow().replace(year=2020)
    )

    rows = json.loads(invoke("history", "--database-url", app_db, "--json").stdout)

    assert [row["user_id"] for row in rows][-1] == "4"
    assert len(rows) == 3


def test_history_filters(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)

    def users(*args: str) -> list[str]:
        result = invoke("history", "--database-url", app_db, "--json", *args)
        assert result.exit_code == 0, result.output
        return sorted(row["user_id"] for row in json.loads(result.stdout))

    assert users("--status", "failed") == ["3"]
    assert users("--status", "sent") == ["1", "4"]
    assert users("--user", "4") == ["4"]
    assert users("--rule", "points-100") == ["1", "3", "4"]
    assert users("--rule", "points-500") == []
    assert users("--since", "2000-01-01") == ["1", "3", "4"]
    assert users("--since", "2999-01-01T00:00") == []
    assert len(users("--limit", "1")) == 1


def test_history_table_shows_error(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)

    result = invoke("history", "--database-url", app_db, "--status", "failed")

    lines = result.stdout.splitlines()
    assert lines[0].startswith("TIME (UTC)")
    assert "550 5.1.1 No such mailbox" in lines[1]
    assert "\x1b[" not in result.stdout


def test_history_csv_parses(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)

    result = invoke("history", "--database-url", app_db, "--csv")

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 3
    failed = next(row for row in rows if row["status"] == "failed")
    assert failed["user_id"] == "3"
    assert failed["last_error"] == "550 5.1.1 No such mailbox"
    assert failed["attempts"] == "1"
    assert all(row["message_id"].startswith("<") for row in rows)


def test_history_rejects_bad_status(invoke: Any, app_db: str) -> None:
    result = invoke("history", "--database-url", app_db, "--status", "done")

    assert result.exit_code == 2
    assert "--status" in result.stderr


# reset ---------------------------------------------------------------------


def test_reset_then_run_sends_exactly_one(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))
    assert len(smtp_server.sink.received) == 3

    reset = invoke("reset", "--database-url", app_db, "--user", "1", "--yes")
    rerun = invoke(*run_args(app_db, smtp_server))

    assert reset.exit_code == 0, reset.output
    assert rerun.exit_code == 0
    assert len(smtp_server.sink.received) == 4
    assert smtp_server.sink.recipients()[-1] == "ada@example.com"
    assert sorted(row["user_id"] for row in notifications(app_db)) == ["1", "3", "4"]


def test_reset_asks_first(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))

    declined = invoke("reset", "--database-url", app_db, "--user", "1", input="n\n")
    assert declined.exit_code == 1
    assert len(notifications(app_db)) == 3

    accepted = invoke("reset", "--database-url", app_db, "--user", "1", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert sorted(row["user_id"] for row in notifications(app_db)) == ["3", "4"]


def test_reset_one_rule_only(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))
    invoke(*run_args(app_db, smtp_server, "--threshold", "1000"))
    assert sorted(row["rule"] for row in notifications(app_db) if row["user_id"] == "4") == [
        "points-100",
        "points-1000",
    ]

    result = invoke("reset", "--database-url", app_db, "--user", "4", "--rule", "points-1000", "--yes")

    assert result.exit_code == 0, result.output
    assert [row["rule"] for row in notifications(app_db) if row["user_id"] == "4"] == ["points-100"]


def test_reset_rejects_claim_inside_lease(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))
    execute(
        app_db,
        "UPDATE sent_notifications SET status = 'pending', claim_token = 'other-run', claimed_at = :now "
        "WHERE user_id = '1'",
        now=utcnow(),
    )

    result = invoke("reset", "--database-url", app_db, "--user", "1", "--yes")

    assert result.exit_code == 1
    assert "a run is sending now" in result.stderr
    assert len(notifications(app_db)) == 3


def test_reset_allows_claim_after_lease(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    invoke(*run_args(app_db, smtp_server))
    execute(
        app_db,
        "UPDATE sent_notifications SET status = 'pending', claim_token = 'crashed-run', claimed_at = :old "
        "WHERE user_id = '1'",
        old=utcnow().replace(year=2020),
    )

    result = invoke("reset", "--database-url", app_db, "--user", "1", "--yes")

    assert result.exit_code == 0, result.output
    assert len(notifications(app_db)) == 2


def test_reset_unknown_user_fails(invoke: Any, app_db: str) -> None:
    result = invoke("reset", "--database-url", app_db, "--user", "42", "--yes")

    assert result.exit_code == 1
    assert "User '42' has no recorded notification" in result.stderr


# retry ---------------------------------------------------------------------


def test_retry_failed_sends_on_next_run(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)
    smtp_server.sink.rcpt_replies.clear()

    retried = invoke("retry", "--failed", "--database-url", app_db)
    row = next(row for row in notifications(app_db) if row["user_id"] == "3")
    assert retried.exit_code == 0, retried.output
    assert row["status"] == "pending"
    assert row["attempts"] == 0

    rerun = invoke(*run_args(app_db, smtp_server))
    assert rerun.exit_code == 0
    assert smtp_server.sink.recipients() == ["ada@example.com", "dee@example.com", "cy@example.com"]
    assert {row["status"] for row in notifications(app_db)} == {"sent"}


def test_retry_filters_by_user(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    sent_with_one_failure(invoke, app_db, smtp_server)

    other = invoke("retry", "--failed", "--user", "1", "--database-url", app_db)

    assert other.exit_code == 0
    assert "Made 0 failed" in other.stdout
    assert [row["status"] for row in notifications(app_db) if row["user_id"] == "3"] == ["failed"]


def test_retry_needs_failed_flag(invoke: Any, app_db: str) -> None:
    result = invoke("retry", "--database-url", app_db)

    assert result.exit_code == 2
    assert "--failed" in result.stderr


# send-test -----------------------------------------------------------------


def test_send_test_delivers_and_records_nothing(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    missing_database = f"sqlite:///{tmp_path / 'absent.db'}"

    result = invoke(
        "send-test",
        "--to",
        "ops@example.com",
        "--mail-url",
        smtp_server.url,
        "--from",
        FROM,
        env={"POLLER_DATABASE_URL": missing_database},
    )

    assert result.exit_code == 0, result.output
    assert smtp_server.sink.recipients() == ["ops@example.com"]
    assert "Sent a test message (points-100) to ops@example.com" in result.stdout
    assert "Sent a test message" not in result.stderr
    message = smtp_server.sink.received[0].message
    assert message["Subject"] == "Congratulations, you reached 100 points!"
    assert "Hello Sample User," in message.get_content()
    assert not (tmp_path / "absent.db").exists()


def test_send_test_refused_fails(invoke: Any, smtp_server: SMTPServer) -> None:
    smtp_server.sink.rcpt_replies["ops@example.com"] = "550 5.7.1 Relaying denied"

    result = invoke("send-test", "--to", "ops@example.com", "--mail-url", smtp_server.url, "--from", FROM)

    assert result.exit_code == 1
    assert "550 5.7.1 Relaying denied" in result.stderr
    assert result.stdout == ""


def test_send_test_bad_address_is_usage_error(invoke: Any, smtp_server: SMTPServer) -> None:
    result = invoke("send-test", "--to", "not-an-address", "--mail-url", smtp_server.url, "--from", FROM)

    assert result.exit_code == 2
    assert "--to 'not-an-address'" in result.stderr
    assert smtp_server.sink.received == []


def test_send_test_unreachable_server_fails(invoke: Any) -> None:
    from tests.conftest import free_port

    result = invoke("send-test", "--to", "ops@example.com", "--mail-url", f"smtp://127.0.0.1:{free_port()}")

    assert result.exit_code == 1
    assert "127.0.0.1" in result.stderr


# config show ---------------------------------------------------------------


def test_config_show_names_each_source(invoke: Any, tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text('threshold = 250\nsubject = "Hi $name"\n', encoding="utf-8")

    result = invoke(
        "config",
        "show",
        "--json",
        "--config",
        str(config),
        "--batch-size",
        "50",
        env={"POLLER_MAIL_URL": "console:"},
    )

    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert settings["batch_size"] == {"value": "50", "source": "option --batch-size"}
    assert settings["mail_url"] == {"value": "console:", "source": "environment POLLER_MAIL_URL"}
    assert settings["threshold"] == {"value": "250", "source": f"file {config}"}
    assert settings["lease"] == {"value": "600.0", "source": "default"}
    assert settings["mail_from"]["value"].startswith("poller@")


def test_config_show_masks_secrets(invoke: Any) -> None:
    password = "pa55-w0rd-x"
    check = "6f1c2d0e-1234-4abc-9def-0123456789ab"
    env = {
        "POLLER_SMTP_PASSWORD": password,
        "POLLER_DATABASE_URL": f"postgresql+psycopg://app:{password}@db.internal/game",
        "POLLER_PING_URL": f"https://hc-ping.example/{check}",
    }

    table = invoke("config", "show", env=env)
    as_json = invoke("config", "show", "--json", env=env)

    for result in (table, as_json):
        assert result.exit_code == 0, result.output
        assert password not in result.output
        assert check not in result.output
    settings = json.loads(as_json.stdout)["settings"]
    assert settings["smtp_password"]["value"] == "***"
    assert settings["database_url"]["value"] == "postgresql+psycopg://app:***@db.internal/game"
    assert settings["ping_url"]["value"] == "https://hc-ping.example/***"


def test_config_show_lists_rules(invoke: Any, tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(
        '[[rules]]\nname = "bronze"\nthreshold = 100\n\n[[rules]]\nname = "gold"\nthreshold = 1000\n', encoding="utf-8"
    )

    result = invoke("config", "show", "--json", "--config", str(config))

    rules = json.loads(result.stdout)["rules"]
    assert [(rule["name"], rule["threshold"]) for rule in rules] == [("bronze", "100"), ("gold", "1000")]


# tables --------------------------------------------------------------------


def test_table_fits_80_columns() -> None:
    rows = [("points-100", "12345", "someone.with.a.long.address@example.com", "sent", "550 " + "x" * 200)]

    text = render_table(("RULE", "USER", "EMAIL", "STATUS", "LAST ERROR"), rows, width=80)

    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" in text
    assert "12345" in text


def test_table_without_width_keeps_cells() -> None:
    long_error = "550 " + "x" * 200

    text = render_table(("USER", "LAST ERROR"), [("1", long_error)])

    assert long_error in text
