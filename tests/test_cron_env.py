"""The installed cron line works in cron's bare environment and under a real cron daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMTPServer, create_users, upgrade

# How long cron needs at most: it reads changed crontabs and starts the
# jobs of a minute when that minute begins.
CRON_WAIT_SECONDS = 120


def prepare(tmp_path: Path) -> tuple[Path, Path]:
    """A config file and SQLite database in a directory whose name needs quoting and % escaping."""
    directory = tmp_path / "conf dir 100%'s"
    directory.mkdir()
    database = directory / "app.db"
    url = f"sqlite:///{database}"
    create_users(
        url,
        [
            {"id": 1, "email": "ada@example.com", "points": 150, "name": "Ada"},
            {"id": 2, "email": "bob@example.com", "points": 5, "name": "Bob"},
        ],
    )
    upgrade(url)
    config = directory / "poller.toml"
    config.write_text(f'database_url = "{url}"\n')
    home = tmp_path / "home"
    home.mkdir()
    return config, home


def cron_command(line: str, fields: int) -> str:
    """Return what cron hands to /bin/sh: the line without its leading fields, \\% turned into %."""
    return line.split(None, fields)[fields].replace("\\%", "%")


def test_installed_line_runs_in_bare_environment(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    config, home = prepare(tmp_path)
    cron_file = tmp_path / "poller"
    installed = invoke(
        "cron", "install", "--schedule", "*/5 * * * *", "--file", str(cron_file), "--run-as", "root",
        "--config", str(config),
        env={"POLLER_MAIL_URL": smtp_server.url, "POLLER_MAIL_FROM": "Game <game@example.com>", "POLLER_LOCK_FILE": ""},
    )  # fmt: skip
    assert installed.exit_code == 0, installed.output
    line = next(line for line in cron_file.read_text().splitlines() if "# poller-job:poller" in line)
    assert "\\%" in line

    result = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "LANG=C", "/bin/sh", "-c", cron_command(line, 6)],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""
    assert smtp_server.sink.recipients() == ["ada@example.com"]
    assert smtp_server.sink.received[0].message["From"] == "Game <game@example.com>"
    assert list(home.iterdir()) == []


def cron_daemon_running() -> bool:
    return subprocess.run(["pgrep", "-x", "cron"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.usefixtures("root_crontab")
def test_cron_daemon_runs_installed_line(invoke: Any, tmp_path: Path, smtp_server: SMTPServer) -> None:
    if shutil.which("pgrep") is None or not cron_daemon_running():
        if os.environ.get("POLLER_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("The cron daemon is not running; .ci/run starts /usr/sbin/cron.")
        pytest.skip("The cron daemon is not running; start /usr/sbin/cron.")
    config, _home = prepare(tmp_path)
    log_file = tmp_path / "cron-run.log"
    name = "test-daemon-" + uuid.uuid4().hex[:8]

    installed = invoke(
        "cron", "install", "--schedule", "* * * * *", "--name", name, "--config", str(config),
        "--log-file", str(log_file),
        env={"POLLER_MAIL_URL": smtp_server.url, "POLLER_MAIL_FROM": "game@example.com", "POLLER_LOCK_FILE": ""},
    )  # fmt: skip
    assert installed.exit_code == 0, installed.output

    deadline = time.monotonic() + CRON_WAIT_SECONDS
    while not smtp_server.sink.received and time.monotonic() < deadline:
        time.sleep(1)

    log_text = log_file.read_text() if log_file.exists() else "(no log file)"
    assert smtp_server.sink.recipients() == ["ada@example.com"], log_text
    # The run logs its summary into --log-file instead of cron mailing it.
    deadline = time.monotonic() + 30
    while "sent 1" not in log_text and time.monotonic() < deadline:
        time.sleep(0.5)
        log_text = log_file.read_text()
    assert "sent 1" in log_text
