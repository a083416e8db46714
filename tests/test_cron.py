"""`poller cron install|show|remove` against real cron files and the real `crontab` program."""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from poller import cron
from poller.errors import ConfigError, CronError

# Lines another tool or a person wrote: each must survive every change byte for byte.
FOREIGN = (
    "# m h  dom mon dow   command\n"
    'MAILTO="ops@example.com"\n'
    "SHELL=/bin/bash\n"
    "PATH = /usr/local/bin:/usr/bin:/bin\n"
    "  # indented comment\twith a tab\n"
    "*/10\t*\t*\t*\t*\t/usr/local/bin/backup --fast   # nightly\n"
    "@reboot /usr/bin/start-thing\n"
    "@daily   /usr/bin/rotate 2>&1 | logger -t rot\\%x\n"
    "\n"
    "0 3 * * 1-5 echo 'a \\% b' > /dev/null\n"
)

SYSTEM_FOREIGN = (
    "SHELL=/bin/sh\n"
    "PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin\n"
    "30 7 * * *\troot\ttest -x /usr/sbin/thing && /usr/sbin/thing\n"
)


def marked(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.endswith(f"# poller-job:{name}")]


def foreign_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if "# poller-job:" not in line)


def line_command(line: str) -> str:
    """Return what cron hands to /bin/sh for a user crontab line: fields removed, \\% unescaped."""
    fields = line.split(None, 5)
    return fields[5].replace("\\%", "%")


# Schedules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/5 * * * *", "*/5 * * * *"),
        ("0  3 * *   mon-fri", "0 3 * * mon-fri"),
        ("@daily", "@daily"),
        ("@reboot", "@reboot"),
        ("0 0 1 jan *", "0 0 1 jan *"),
    ],
)
def test_valid_schedules_are_normalised(expression: str, expected: str) -> None:
    assert cron.validate_schedule(expression) == expected


@pytest.mark.parametrize(
    ("expression", "named"),
    [
        ("60 * * * *", "minute field '60'"),
        ("* 24 * * *", "hour field '24'"),
        ("* * 0 * *", "day of month field '0'"),
        ("* * * 13 *", "month field '13'"),
        ("* * * * 8", "day of week field '8'"),
        ("*/0 * * * *", "minute field '*/0'"),
        ("? * * * *", "minute field '?'"),
        ("* * * *", "has 4 fields"),
        ("0 * * * * *", "has 6 fields"),
        ("@often", "'@often' is not a special schedule"),
        ("@annually", "'@annually' is not a special schedule"),
    ],
)
def test_invalid_schedule_names_field(expression: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        cron.validate_schedule(expression)

    assert named in str(error.value)


def test_schedule_described_in_words() -> None:
    assert cron.describe_schedule("*/5 * * * *") == "Every 5 minutes"
    assert cron.describe_schedule("@reboot") == "At system startup"
    assert cron.describe_schedule("@daily") == "At 00:00"


def test_next_runs_are_three_times() -> None:
    now = datetime.datetime(2030, 1, 1, 10, 2)

    runs = cron.next_runs("*/5 * * * *", now=now)

    assert runs == [datetime.datetime(2030, 1, 1, 10, minute) for minute in (5, 10, 15)]
    assert cron.next_runs("@reboot", now=now) == []


# Lines -------------------------------------------------------------------


def test_percent_is_escaped_and_read_back() -> None:
    line = cron.render_line("* * * * *", "/opt/p run --config '/etc/50%/c.toml'", "pct")

    assert line == "* * * * * /opt/p run --config '/etc/50\\%/c.toml' # poller-job:pct\n"
    entries = cron.find_entries(line, "pct", system=False)
    assert entries[0][1].command == "/opt/p run --config '/etc/50%/c.toml'"


def test_quoted_hash_is_rejected() -> None:
    with pytest.raises(ConfigError) as error:
        cron.render_line("* * * * *", "/opt/p run --config '/etc/a #b/c.toml'", "hash")

    assert "' #'" in str(error.value)


def test_with_line_keeps_foreign_lines_byte_for_byte() -> None:
    line = cron.render_line("*/5 * * * *", "/opt/p run --quiet", "keep")

    first = cron.with_line(FOREIGN, "keep", line, system=False)
    second = cron.with_line(first, "keep", line.replace("*/5", "*/7"), system=False)

    assert foreign_lines(first) == FOREIGN
    assert foreign_lines(second) == FOREIGN
    assert marked(second, "keep") == ["*/7 * * * * /opt/p run --quiet # poller-job:keep"]
    assert cron.without_lines(second, "keep", system=False) == FOREIGN


def test_with_line_terminates_last_foreign_line() -> None:
    line = cron.render_line("@hourly", "/opt/p run", "eol")

    result = cron.with_line("@reboot /bin/true", "eol", line, system=False)

    assert result == "@reboot /bin/true\n@hourly /opt/p run # poller-job:eol\n"


def test_other_names_are_left_alone() -> None:
    text = cron.with_line("", "one", cron.render_line("@daily", "/opt/p run", "one"), system=False)
    text = cron.with_line(text, "two", cron.render_line("@hourly", "/opt/p run", "two"), system=False)

    removed = cron.without_lines(text, "one", system=False)

    assert marked(removed, "one") == []
    assert marked(removed, "two") == ["@hourly /opt/p run # poller-job:two"]


def test_marker_in_command_text_is_not_a_match() -> None:
    text = "* * * * * echo poller-job:sneaky\n"

    assert cron.find_entries(text, None, system=False) == []


def test_commented_out_line_counts_as_poller_line() -> None:
    text = "# */5 * * * * /opt/p run --quiet # poller-job:off\n"

    entries = cron.find_entries(text, "off", system=False)

    assert len(entries) == 1
    assert entries[0][1].enabled is False
    assert entries[0][1].schedule == "*/5 * * * *"


# The CLI on cron files -----------------------------------------------------


@pytest.fixture
def settings_env(tmp_path: Path) -> dict[str, str]:
    return {"POLLER_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "POLLER_MAIL_URL": "smtp://127.0.0.1:2525"}


def test_install_into_file_keeps_system_lines(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    cron_file.write_text(SYSTEM_FOREIGN)

    first = invoke(
        "cron", "install", "--schedule", "*/5 * * * *", "--file", str(cron_file), "--run-as", "nobody", env=settings_env
    )
    second = invoke(
        "cron", "install", "--schedule", "@hourly", "--file", str(cron_file), "--run-as", "nobody", env=settings_env
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    text = cron_file.read_text()
    assert foreign_lines(text) == SYSTEM_FOREIGN
    lines = marked(text, "poller")
    assert len(lines) == 1
    assert lines[0].startswith("@hourly nobody /")
    assert oct(cron_file.stat().st_mode & 0o777) == "0o644"


def test_install_diff_shows_replaced_line(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    invoke(
        "cron", "install", "--schedule", "*/5 * * * *", "--file", str(cron_file), "--run-as", "nobody", env=settings_env
    )

    result = invoke(
        "cron", "install", "--schedule", "@hourly", "--file", str(cron_file), "--run-as", "nobody", env=settings_env
    )

    removed = [line for line in result.stdout.splitlines() if line.startswith("-*/5 ")]
    added = [line for line in result.stdout.splitlines() if line.startswith("+@hourly ")]
    assert len(removed) == 1
    assert len(added) == 1
    assert result.stdout.startswith(f"--- {cron_file} (current)\n+++ {cron_file} (new)\n")


def test_dry_run_writes_nothing(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    cron_file.write_text(SYSTEM_FOREIGN)

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "nobody", "--dry-run",
        env=settings_env,
    )  # fmt: skip

    assert result.exit_code == 0
    assert "+@daily nobody " in result.stdout
    assert "nothing was written" in result.stdout
    assert cron_file.read_text() == SYSTEM_FOREIGN


def test_invalid_schedule_leaves_file_unchanged(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    cron_file.write_text(SYSTEM_FOREIGN)

    result = invoke("cron", "install", "--schedule", "*/5 * * * mon-xyz", "--file", str(cron_file), env=settings_env)

    assert result.exit_code == 2
    assert "day of week field 'mon-xyz'" in result.stderr
    assert cron_file.read_text() == SYSTEM_FOREIGN


def test_remove_from_file_keeps_others(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    cron_file.write_text(SYSTEM_FOREIGN)
    invoke("cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "nobody", env=settings_env)

    result = invoke("cron", "remove", "--file", str(cron_file))

    assert result.exit_code == 0, result.output
    assert cron_file.read_text() == SYSTEM_FOREIGN
    assert "-@daily nobody " in result.stdout


def test_remove_deletes_file_left_empty(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    invoke("cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "nobody", env=settings_env)

    result = invoke("cron", "remove", "--file", str(cron_file))

    assert result.exit_code == 0
    assert not cron_file.exists()


def test_cron_d_file_name_with_dot_rejected(invoke: Any, settings_env: dict[str, str]) -> None:
    result = invoke("cron", "install", "--schedule", "@daily", "--file", "/etc/cron.d/poller.cron", env=settings_env)

    assert result.exit_code == 2
    assert "contain a dot" in result.stderr
    assert not Path("/etc/cron.d/poller.cron").exists()


def test_line_has_absolute_paths(invoke: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "conf.d" / "poller.toml"
    config.parent.mkdir()
    config.write_text('mail_url = "mbox:relative.mbox"\nbody_file = "body.txt"\n')
    (tmp_path / "body.txt").write_text("Hello $name\n")
    cron_file = tmp_path / "poller"

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "nobody",
        "--config", "conf.d/poller.toml", "--database-url", "sqlite:///app.db", "--log-file", "logs/poller.log",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    line = marked(cron_file.read_text(), "poller")[0]
    words = shlex.split(line.split(None, 2)[2], comments=True)
    assert words[0] == str(Path(sys.executable).parent / "poller")
    assert words[words.index("--config") + 1] == str(config)
    assert words[words.index("--database-url") + 1] == f"sqlite:///{tmp_path / 'app.db'}"
    assert words[words.index("--mail-url") + 1] == f"mbox:{tmp_path / 'relative.mbox'}"
    assert words[words.index("--body-file") + 1] == str(tmp_path / "body.txt")
    assert words[-2:] == [f">>{tmp_path / 'logs' / 'poller.log'}", "2>&1"]
    assert "--quiet" not in words
    assert "~" not in line


def test_default_line_runs_quiet(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"

    invoke("cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--run-as", "nobody", env=settings_env)

    words = shlex.split(marked(cron_file.read_text(), "poller")[0], comments=True)
    assert words[3:6] == ["run", "--quiet", "--database-url"]


def test_password_from_environment_rejected(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    secret = "hunter2-" + uuid.uuid4().hex

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file),
        env={**settings_env, "POLLER_SMTP_PASSWORD": secret},
    )  # fmt: skip

    assert result.exit_code == 2
    assert "--smtp-password-file" in result.stderr
    assert secret not in result.output
    assert not cron_file.exists()


def test_database_password_rejected(invoke: Any, tmp_path: Path) -> None:
    cron_file = tmp_path / "poller"

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file),
        "--database-url", "postgresql+psycopg://app:s3cret@127.0.0.1/app",
    )  # fmt: skip

    assert result.exit_code == 2
    assert "s3cret" not in result.output
    assert "--database-url contains a password" in result.stderr
    assert "config file" in result.stderr
    assert not cron_file.exists()


def test_password_in_config_stays_there(invoke: Any, tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text('mail_url = "smtp://mailer@127.0.0.1:2525"\nsmtp_password = "c0nfig-pass"\n')
    config.chmod(0o644)
    cron_file = tmp_path / "poller"

    result = invoke("cron", "install", "--schedule", "@daily", "--file", str(cron_file), "--config", str(config))

    assert result.exit_code == 0, result.output
    text = cron_file.read_text()
    assert "c0nfig-pass" not in text
    assert f"--config {config}" in text
    assert "readable by other users" in result.stderr


def test_password_file_is_referenced(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    password_file = tmp_path / "smtp-password"
    password_file.write_text("f1le-pass\n")
    password_file.chmod(0o600)
    cron_file = tmp_path / "poller"

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file),
        env={**settings_env, "POLLER_SMTP_PASSWORD_FILE": str(password_file)},
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    text = cron_file.read_text()
    assert f"--smtp-password-file {password_file}" in text
    assert "f1le-pass" not in text
    assert "readable by other users" not in result.stderr


def test_show_lists_schedule_and_next_runs(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    cron_file = tmp_path / "poller"
    invoke(
        "cron", "install", "--schedule", "*/15 * * * *", "--file", str(cron_file), "--run-as", "nobody", "--name", "q",
        env=settings_env,
    )  # fmt: skip

    result = invoke("cron", "show", "--file", str(cron_file))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "q"
    assert lines[1] == "  schedule: */15 * * * * (Every 15 minutes)"
    assert lines[2].startswith("  next runs: ")
    assert len(lines[2].split(", ")) == 3
    assert lines[3] == "  runs as: nobody"


def test_show_without_line_says_so(invoke: Any, tmp_path: Path) -> None:
    result = invoke("cron", "show", "--file", str(tmp_path / "none"))

    assert result.exit_code == 0
    assert "No poller line" in result.stdout


# The real crontab program --------------------------------------------------


def crontab_text() -> str:
    result = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def unique_name() -> str:
    return "test-" + uuid.uuid4().hex[:10]


def make_venv_copy(tmp_path: Path) -> Path:
    """A second 'virtual environment': another directory holding a poller executable."""
    other = tmp_path / "other-venv" / "bin" / "poller"
    other.parent.mkdir(parents=True)
    shutil.copy2(Path(sys.executable).parent / "poller", other)
    return other


@pytest.mark.usefixtures("root_crontab")
def test_crontab_install_reinstall_and_remove(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    name = unique_name()
    subprocess.run(["crontab", "-"], input=FOREIGN, text=True, check=True)

    installed = invoke("cron", "install", "--schedule", "*/5 * * * *", "--name", name, env=settings_env)
    after_install = crontab_text()
    reinstalled = invoke("cron", "install", "--schedule", "0 * * * *", "--name", name, env=settings_env)
    after_reinstall = crontab_text()

    assert installed.exit_code == 0, installed.output
    assert reinstalled.exit_code == 0, reinstalled.output
    assert "Installed" in installed.stdout
    assert len(marked(after_install, name)) == 1
    assert marked(after_reinstall, name)[0].startswith("0 * * * * /")
    assert len(marked(after_reinstall, name)) == 1
    assert foreign_lines(after_reinstall) == FOREIGN

    # The same install from another directory and another executable path.
    other = make_venv_copy(tmp_path)
    moved = subprocess.run(
        [str(other), "cron", "install", "--schedule", "@hourly", "--name", name],
        cwd=tmp_path / "other-venv",
        env={**os.environ, **settings_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    after_move = crontab_text()
    assert moved.returncode == 0, moved.stderr
    assert len(marked(after_move, name)) == 1
    assert marked(after_move, name)[0].startswith(f"@hourly {other} run ")
    assert foreign_lines(after_move) == FOREIGN

    removed = invoke("cron", "remove", "--name", name)
    assert removed.exit_code == 0, removed.output
    assert crontab_text() == FOREIGN


@pytest.mark.usefixtures("root_crontab")
def test_crontab_invalid_schedule_unchanged(invoke: Any, settings_env: dict[str, str]) -> None:
    subprocess.run(["crontab", "-"], input=FOREIGN, text=True, check=True)

    result = invoke("cron", "install", "--schedule", "* * * * 9", "--name", unique_name(), env=settings_env)

    assert result.exit_code == 2
    assert "day of week field '9'" in result.stderr
    assert crontab_text() == FOREIGN


@pytest.mark.usefixtures("root_crontab")
def test_crontab_show_lists_installed_line(invoke: Any, settings_env: dict[str, str]) -> None:
    name = unique_name()
    invoke("cron", "install", "--schedule", "@weekly", "--name", name, env=settings_env)

    result = invoke("cron", "show", "--name", name)

    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == name
    assert "  schedule: @weekly (At 00:00, only on Sunday)" in result.stdout.splitlines()


@pytest.mark.usefixtures("root_crontab")
def test_missing_crontab_program_fails(invoke: Any, tmp_path: Path, settings_env: dict[str, str]) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--name", unique_name(), env={**settings_env, "PATH": str(empty)}
    )

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "crontab program was not found" in result.stderr
    assert "Installed" not in result.stdout


@pytest.mark.usefixtures("root_crontab")
def test_user_without_permission_fails(invoke: Any, settings_env: dict[str, str]) -> None:
    # crontab -u needs root; a user that does not exist fails the same way for root.
    result = invoke(
        "cron", "install", "--schedule", "@daily", "--name", unique_name(), "--user", "no-such-user-" + uuid.uuid4().hex[:6],
        env=settings_env,
    )  # fmt: skip

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Cannot read the crontab of no-such-user-")
    assert result.stderr.count("\n") == 1
    assert "Installed" not in result.stdout


@pytest.mark.usefixtures("root_crontab")
def test_concurrent_edit_is_not_overwritten(settings_env: dict[str, str]) -> None:
    subprocess.run(["crontab", "-"], input=FOREIGN, text=True, check=True)
    target = cron.Target()
    old = cron.read_crontab(target)
    new = cron.with_line(old, "race", cron.render_line("@daily", "/opt/p run", "race"), system=False)
    edited = FOREIGN + "15 4 * * * /usr/bin/added-meanwhile\n"
    subprocess.run(["crontab", "-"], input=edited, text=True, check=True)

    with pytest.raises(CronError) as error:
        cron.apply_change(target, old, new)

    assert "changed while poller was preparing" in str(error.value)
    assert crontab_text() == edited


# systemd -------------------------------------------------------------------


def test_systemd_units_written(invoke: Any, tmp_path: Path) -> None:
    database = tmp_path / "100% app.db"
    units = tmp_path / "units"
    units.mkdir()

    result = invoke(
        "cron", "systemd", "--on-calendar", "*:0/10", "--name", "poller-game", "--output-dir", str(units),
        "--database-url", f"sqlite:///{database}", "--mail-url", "smtp://127.0.0.1:2525",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    service = (units / "poller-game.service").read_text()
    timer = (units / "poller-game.timer").read_text()
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f'ExecStart="{Path(sys.executable).parent / "poller"}" "run" ')
    assert f'"--database-url" "sqlite:///{tmp_path}/100%% app.db"' in exec_start
    assert "SuccessExitStatus=75" in service.splitlines()
    assert "OnCalendar=*:0/10" in timer.splitlines()
    assert "systemctl enable --now poller-game.timer" in result.stdout


def test_systemd_rejects_bad_calendar(invoke: Any) -> None:
    result = invoke("cron", "systemd", "--on-calendar", "every 5 min; rm -rf /")

    assert result.exit_code == 2
    assert "systemd-analyze calendar" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_rejects_bad_syntax(invoke: Any) -> None:
    result = invoke("cron", "systemd", "--on-calendar", "*:0/99/x")

    assert result.exit_code == 2
    assert "Failed to parse calendar specification" in result.stderr


# crontab.example -----------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "crontab.example"


@pytest.mark.usefixtures("root_crontab")
def test_example_is_accepted_by_crontab() -> None:
    text = EXAMPLE.read_text()

    result = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    assert crontab_text() == text


def test_example_lines_are_poller_lines() -> None:
    text = EXAMPLE.read_text()
    system_line = next(line for line in text.splitlines() if line.startswith("#   */5 "))

    user_entries = [entry for _, entry in cron.find_entries(text, "poller", system=False) if entry.enabled]
    system_entries = cron.find_entries(system_line[4:] + "\n", "poller", system=True)

    assert [entry.schedule for entry in user_entries] == ["*/5 * * * *"]
    assert user_entries[0].command.startswith("/opt/poller/venv/bin/poller run --quiet --config /etc/poller/")
    assert system_entries[0][1].user == "poller"
