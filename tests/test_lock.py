"""The run lock: overlapping `poller run` processes, crashed holders, and the default lock path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller import lock
from poller.errors import ConfigError, LockBusy
from tests.conftest import SMTPServer, create_users, poller_executable, subprocess_env, upgrade


@pytest.fixture
def silent_smtp() -> Iterator[str]:
    """A TCP listener that never greets, so a run connecting to it hangs until killed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"smtp://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def due_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    create_users(url, [{"id": 1, "email": "ada@example.com", "points": 500}])
    upgrade(url)
    return url


def start_run(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [poller_executable(), "run", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_holder(lock_file: Path, process: subprocess.Popen[str]) -> None:
    """Wait until `process` has written its pid into the lock file, which it does after taking the lock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lock_file.exists() and lock_file.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    pytest.fail("The first run did not take the lock within 30 s")


def test_second_run_exits_75_then_runs_after_kill(
    tmp_path: Path, due_db: str, silent_smtp: str, smtp_server: SMTPServer
) -> None:
    lock_file = tmp_path / "poller.lock"
    env = subprocess_env(tmp_path, POLLER_DATABASE_URL=due_db, POLLER_SMTP_TIMEOUT="120")
    holder = start_run({**env, "POLLER_MAIL_URL": silent_smtp})
    try:
        wait_for_holder(lock_file, holder)

        second = subprocess.run(
            [poller_executable(), "run"],
            env={**env, "POLLER_MAIL_URL": smtp_server.url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert second.returncode == 75
        assert holder.poll() is None
        assert second.stderr.count("\n") == 1
        assert f"Another poller run (pid {holder.pid}) is active" in second.stderr
        assert smtp_server.sink.received == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)

    # The kernel dropped the dead holder's flock; the lock file stays behind.
    assert lock_file.exists()
    third = subprocess.run(
        [poller_executable(), "run", "--lease", "1"],
        env={**env, "POLLER_MAIL_URL": smtp_server.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert third.returncode == 0, third.stderr
    assert smtp_server.sink.recipients() == ["ada@example.com"]


def test_wait_lock_proceeds_when_holder_dies(
    tmp_path: Path, due_db: str, silent_smtp: str, smtp_server: SMTPServer
) -> None:
    lock_file = tmp_path / "poller.lock"
    env = subprocess_env(tmp_path, POLLER_DATABASE_URL=due_db, POLLER_SMTP_TIMEOUT="120")
    holder = start_run({**env, "POLLER_MAIL_URL": silent_smtp})
    waiter = None
    try:
        wait_for_holder(lock_file, holder)
        waiter = start_run({**env, "POLLER_MAIL_URL": smtp_server.url}, "--wait-lock", "60", "--lease", "1")
        time.sleep(1)
        assert waiter.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)

    _, stderr = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, stderr
    assert smtp_server.sink.recipients() == ["ada@example.com"]


def test_busy_lock_raises_lock_busy(tmp_path: Path) -> None:
    path = tmp_path / "held.lock"

    with lock.RunLock(path), pytest.raises(LockBusy) as error:
        lock.RunLock(path).acquire()

    assert str(os.getpid()) in str(error.value)
    assert error.value.exit_code == 75


def test_lock_released_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "held.lock"

    with lock.RunLock(path):
        pass
    with lock.RunLock(path) as again:
        assert again.fd is not None


def test_wait_gives_up_after_deadline(tmp_path: Path) -> None:
    path = tmp_path / "held.lock"

    with lock.RunLock(path), pytest.raises(LockBusy) as error:
        lock.RunLock(path, wait=0.3).acquire()

    assert "after waiting 0.3 s" in str(error.value)


def test_symlinked_lock_file_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "poller.lock"
    link.symlink_to(victim)

    with pytest.raises(ConfigError):
        lock.RunLock(link).acquire()

    assert victim.read_text() == "keep me\n"


def test_unwritable_lock_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        lock.RunLock(tmp_path / "missing-dir" / "poller.lock").acquire()

    assert "--lock-file" in str(error.value)


def test_default_path_same_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = lock.default_lock_path("sqlite:///../app.db")
    monkeypatch.chdir("/")

    absolute = lock.default_lock_path(f"sqlite:///{tmp_path / 'app.db'}")

    assert relative == absolute


def test_default_path_differs_per_database() -> None:
    first = lock.default_lock_path("postgresql+psycopg://poller@127.0.0.1/one")
    second = lock.default_lock_path("postgresql+psycopg://poller@127.0.0.1/two")

    assert first != second
    assert first.parent == second.parent


def test_default_path_not_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)

    path = lock.default_lock_path("sqlite:///app.db")

    assert path.parent != tmp_path
    assert str(path.parent) in ("/run/lock", "/var/lock")


def test_sqlite_driver_url_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert (
        lock.canonical_database("sqlite+pysqlite:///app.db?timeout=5")
        == f"sqlite+pysqlite:///{tmp_path}/app.db?timeout=5"
    )
    assert lock.canonical_database("sqlite:////abs/app.db") == "sqlite:////abs/app.db"
    assert lock.canonical_database("sqlite:///:memory:") == "sqlite:///:memory:"
