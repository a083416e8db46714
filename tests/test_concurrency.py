"""Many `poller run` processes at once against one database, as on separate hosts."""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import SMTPServer, create_users, notifications, poller_executable, subprocess_env, upgrade

PROCESSES = 8
USERS = 300


def test_parallel_runs_send_each_user_once(database_url: str, smtp_server: SMTPServer, tmp_path: Path) -> None:
    create_users(
        database_url, [{"id": n, "email": f"u{n}@example.com", "points": 100 + n} for n in range(1, USERS + 1)]
    )
    upgrade(database_url)
    poller = poller_executable()

    # Each process gets its own lock file, so only the database claims keep
    # them apart, as for runs on separate hosts.
    processes = []
    for number in range(PROCESSES):
        env = subprocess_env(
            tmp_path,
            POLLER_DATABASE_URL=database_url,
            POLLER_MAIL_URL=smtp_server.url,
            POLLER_LOCK_FILE=str(tmp_path / f"host-{number}.lock"),
            POLLER_BATCH_SIZE="20",
        )
        processes.append(
            subprocess.Popen(
                [poller, "run", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, (_stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    counts = [json.loads(stdout) for stdout, _stderr in outputs]
    assert sum(count["sent"] for count in counts) == USERS
    assert sum(1 for count in counts if count["sent"] > 0) >= 2
    received = collections.Counter(smtp_server.sink.recipients())
    assert len(received) == USERS
    assert max(received.values()) == 1
    rows = notifications(database_url)
    assert len(rows) == USERS
    assert {row["status"] for row in rows} == {"sent"}


def test_sqlite_waits_for_competing_writer(tmp_path: Path, smtp_server: SMTPServer) -> None:
    database = tmp_path / "app.db"
    url = f"sqlite:///{database}"
    create_users(url, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, 11)])
    upgrade(url)
    env = subprocess_env(tmp_path, POLLER_DATABASE_URL=url, POLLER_MAIL_URL=smtp_server.url)

    # Another application holds an exclusive lock for three seconds, which
    # blocks readers and writers alike.
    writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE users SET name = 'busy' WHERE id = 1")
    release = threading.Timer(3.0, writer.execute, ("COMMIT",))
    release.start()
    started = time.monotonic()
    try:
        result = subprocess.run(
            [poller_executable(), "run", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        release.join()
        writer.close()

    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 3.0
    assert json.loads(result.stdout)["sent"] == 10
    assert len(smtp_server.sink.received) == 10


def test_sqlite_busy_timeout_gives_up_cleanly(tmp_path: Path, smtp_server: SMTPServer) -> None:
    database = tmp_path / "app.db"
    url = f"sqlite:///{database}"
    create_users(url, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, 11)])
    upgrade(url)
    env = subprocess_env(tmp_path, POLLER_DATABASE_URL=f"{url}?timeout=0.5", POLLER_MAIL_URL=smtp_server.url)

    writer = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE users SET name = 'busy' WHERE id = 1")
    try:
        result = subprocess.run([poller_executable(), "run"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        writer.execute("COMMIT")
        writer.close()

    assert result.returncode == 1
    assert "database is locked" in result.stderr
    assert smtp_server.sink.received == []
    assert notifications(url) == []
