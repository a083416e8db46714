"""The progress bar under a pseudo-terminal, and shell completion."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.conftest import SMTPServer, create_users, poller_executable, subprocess_env, upgrade

DUE_USERS = 30


def due_database(tmp_path: Path, count: int) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    create_users(url, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, count + 1)])
    upgrade(url)
    return url


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with stdin, stdout and stderr on a pseudo-terminal; return its exit code and output."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(args, stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)

    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    code = process.wait(timeout=timeout)
    return code, b"".join(chunks).decode("utf-8", "replace")


def env_for(tmp_path: Path, url: str, smtp: SMTPServer) -> dict[str, str]:
    return subprocess_env(tmp_path, POLLER_DATABASE_URL=url, POLLER_MAIL_URL=smtp.url, COLUMNS="80", TERM="xterm")


def test_progress_bar_under_pty(tmp_path: Path, smtp_server: SMTPServer) -> None:
    url = due_database(tmp_path, DUE_USERS)

    code, output = run_in_pty([poller_executable(), "run"], env_for(tmp_path, url, smtp_server))

    assert code == 0, output
    assert len(smtp_server.sink.received) == DUE_USERS
    assert "Sending" in output
    assert f"{DUE_USERS}/{DUE_USERS}" in output
    assert "/s" in output


def test_no_progress_bar_in_pipe(tmp_path: Path, smtp_server: SMTPServer) -> None:
    url = due_database(tmp_path, DUE_USERS)

    result = subprocess.run(
        [poller_executable(), "run"],
        env=env_for(tmp_path, url, smtp_server),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert len(smtp_server.sink.received) == DUE_USERS
    assert "Sending" not in result.stderr
    assert "\r" not in result.stderr


def test_no_progress_bar_with_quiet(tmp_path: Path, smtp_server: SMTPServer) -> None:
    url = due_database(tmp_path, DUE_USERS)

    code, output = run_in_pty([poller_executable(), "run", "--quiet"], env_for(tmp_path, url, smtp_server))

    assert code == 0, output
    assert output == ""


def test_no_progress_bar_for_a_handful(tmp_path: Path, smtp_server: SMTPServer) -> None:
    url = due_database(tmp_path, 3)

    code, output = run_in_pty([poller_executable(), "run"], env_for(tmp_path, url, smtp_server))

    assert code == 0, output
    assert "Sending" not in output
    assert "sent 3" in output


def test_table_fits_pty_width(tmp_path: Path, smtp_server: SMTPServer) -> None:
    url = due_database(tmp_path, 3)
    long_error = "550 5.1.1 " + "mailbox unavailable " * 10
    smtp_server.sink.rcpt_replies["u1@example.com"] = long_error
    env = env_for(tmp_path, url, smtp_server)
    subprocess.run([poller_executable(), "run", "--quiet"], env=env, capture_output=True, timeout=60)

    code, output = run_in_pty([poller_executable(), "history"], env)

    assert code == 0, output
    lines = [line for line in output.replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines() if line]
    assert len(lines) == 4
    assert all(len(line) <= 80 for line in lines)
    assert "…" in lines[-1] or "…" in "".join(lines)


def offered(stdout: str) -> list[str]:
    """Return the values of click's bash completion output, one `type,value` line each."""
    return [line.partition(",")[2] for line in stdout.splitlines()]


def completion(shell_action: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "_POLLER_COMPLETE": shell_action, **extra}
    return subprocess.run([poller_executable()], env=env, capture_output=True, text=True, timeout=60)


def test_completion_scripts_for_each_shell() -> None:
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete --no-files")):
        result = completion(f"{shell}_source")
        assert result.returncode == 0, result.stderr
        assert marker in result.stdout, shell


def test_completion_offers_operator_commands() -> None:
    result = completion("bash_complete", COMP_WORDS="poller hist", COMP_CWORD="1")

    assert result.returncode == 0, result.stderr
    assert "history" in offered(result.stdout)


def test_completion_offers_options() -> None:
    result = completion("bash_complete", COMP_WORDS="poller history --st", COMP_CWORD="2")

    assert "--status" in offered(result.stdout)
