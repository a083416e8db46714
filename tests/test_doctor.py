"""`poller doctor` against real databases, a real SMTP server and real cron files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import SMTPServer, create_users, free_port


def doctor_lines(output: str) -> dict[str, str]:
    """Map each check's name to its status and detail, from doctor's output."""
    lines = {}
    for line in output.splitlines():
        status, _, rest = line.partition("  ")
        name, _, detail = rest.strip().partition(": ")
        lines[name] = f"{status.strip()} {detail}"
    return lines


def installed_cron_file(invoke: Any, tmp_path: Path, env: dict[str, str]) -> Path:
    cron_file = tmp_path / "poller"
    result = invoke("cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "root", env=env)
    assert result.exit_code == 0, result.output
    return cron_file


def test_doctor_passes_on_good_setup(invoke: Any, app_db: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    env = {"POLLER_DATABASE_URL": app_db, "POLLER_MAIL_URL": smtp_server.url}
    cron_file = installed_cron_file(invoke, tmp_path, env)

    result = invoke("doctor", "--file", str(cron_file), env=env)

    assert result.exit_code == 0, result.output
    checks = doctor_lines(result.stdout)
    assert checks["configuration"].startswith("ok ")
    assert checks["database"].startswith("ok ")
    assert checks["users table"] == "ok 'users' has the columns id, email, points, name"
    assert checks["mail"].startswith(f"ok smtp://127.0.0.1:{smtp_server.port} answered EHLO")
    assert checks["cron line"].startswith("ok @daily runs /")
    assert smtp_server.sink.received == []


def test_doctor_warns_without_points_index(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke("doctor", env={"POLLER_DATABASE_URL": app_db, "POLLER_MAIL_URL": smtp_server.url})

    checks = doctor_lines(result.stdout)
    assert checks["points index"].startswith("warn Table 'users' has no index on 'points'")
    assert "CREATE INDEX ix_users_points ON users (points);" in checks["points index"]


def test_doctor_finds_points_index(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    engine = sa.create_engine(app_db)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE INDEX users_by_points ON users (points)")
    engine.dispose()

    result = invoke("doctor", env={"POLLER_DATABASE_URL": app_db, "POLLER_MAIL_URL": smtp_server.url})

    assert doctor_lines(result.stdout)["points index"] == "ok users.points is indexed"


def test_doctor_fails_on_unmigrated_database(invoke: Any, database_url: str, smtp_server: SMTPServer) -> None:
    create_users(database_url, [{"id": 1, "email": "a@example.com", "points": 1}])

    result = invoke("doctor", env={"POLLER_DATABASE_URL": database_url, "POLLER_MAIL_URL": smtp_server.url})

    assert result.exit_code == 1
    checks = doctor_lines(result.stdout)
    assert checks["database"].startswith("FAIL ")
    assert "poller db upgrade" in checks["database"]


def test_doctor_fails_on_missing_column(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(
        "doctor", "--points-column", "score", env={"POLLER_DATABASE_URL": app_db, "POLLER_MAIL_URL": smtp_server.url}
    )

    assert result.exit_code == 1
    assert doctor_lines(result.stdout)["users table"].startswith("FAIL Table 'users' has no column 'score'")


def test_doctor_fails_when_mail_server_down(invoke: Any, sqlite_url: str) -> None:
    create_users(sqlite_url, [])

    result = invoke(
        "doctor", env={"POLLER_DATABASE_URL": sqlite_url, "POLLER_MAIL_URL": f"smtp://127.0.0.1:{free_port()}"}
    )

    assert result.exit_code == 1
    assert doctor_lines(result.stdout)["mail"].startswith("FAIL Cannot connect to the mail server at 127.0.0.1:")


def test_doctor_fails_on_stale_cron_line(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    cron_file = tmp_path / "poller"
    cron_file.write_text("@daily root /gone/venv/bin/poller run --quiet # poller-job:poller\n")

    result = invoke("doctor", "--file", str(cron_file), env={"POLLER_MAIL_URL": smtp_server.url})

    assert result.exit_code == 1
    assert doctor_lines(result.stdout)["cron line"].startswith("FAIL runs '/gone/venv/bin/poller'")


def test_doctor_fails_on_missing_config_in_line(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(f'mail_url = "{smtp_server.url}"\n')
    cron_file = tmp_path / "poller"
    installed = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "root", "--config", str(config)
    )
    assert installed.exit_code == 0, installed.output
    config.unlink()

    result = invoke("doctor", "--file", str(cron_file), env={"POLLER_MAIL_URL": smtp_server.url})

    assert result.exit_code == 1
    assert doctor_lines(result.stdout)["cron line"] == (
        f"FAIL uses config file {str(config)!r}, which does not exist; reinstall with poller cron install"
    )


def test_doctor_reports_bad_configuration(invoke: Any, tmp_path: Path) -> None:
    result = invoke("doctor", "--file", str(tmp_path / "poller"), env={"POLLER_THRESHOLD": "lots"})

    assert result.exit_code == 1
    assert doctor_lines(result.stdout)["configuration"].startswith("FAIL Invalid value 'lots'")


def test_doctor_warns_on_readable_config_password(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(f'mail_url = "{smtp_server.url}"\nsmtp_password = "c0nfig-pass"\n')
    config.chmod(0o644)

    result = invoke("doctor", "--config", str(config), "--file", str(tmp_path / "no-cron"))

    line = doctor_lines(result.stdout)["config file"]
    assert line.startswith("warn ")
    assert "readable by other users" in line
    assert "chmod o-r" in line
    assert "c0nfig-pass" not in result.output


def test_doctor_warns_on_database_url_password(invoke: Any, tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text('database_url = "postgresql+psycopg://app:s3cret@127.0.0.1:1/app"\n')
    config.chmod(0o604)

    result = invoke("doctor", "--config", str(config), "--file", str(tmp_path / "no-cron"))

    assert doctor_lines(result.stdout)["config file"].startswith("warn ")
    assert "s3cret" not in result.output


def test_doctor_accepts_private_config_password(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(f'mail_url = "{smtp_server.url}"\nsmtp_password = "c0nfig-pass"\n')
    config.chmod(0o600)

    result = invoke("doctor", "--config", str(config), "--file", str(tmp_path / "no-cron"))

    assert doctor_lines(result.stdout)["config file"].startswith("ok ")
