"""`poller run` killed with SIGKILL at many points, then run again.

The SMTP server kills the poller process when it observes a chosen event:
the greeting, the Nth MAIL or RCPT, inside DATA, or shortly after it
replied 250 (which lands in marking, or in selecting and claiming the next
batch). After every crash the next run must pick up where the dead one
stopped: nobody lost, and a second copy only of the message that was in
flight, with the same Message-ID.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from poller.schema import sent_notifications
from tests.conftest import MailSink, create_users, free_port, poller_executable, subprocess_env, upgrade

USERS = 80
BATCH_SIZE = 5

# (event, occurrence in this run, seconds between the event and SIGKILL)
KILL_POINTS = [
    ("ehlo", 1, 0.0),
    ("mail", 1, 0.0),
    ("rcpt", 1, 0.0),
    ("data", 1, 0.0),
    ("accepted", 1, 0.0),
    ("accepted", 2, 0.01),
    ("mail", 3, 0.0),
    ("rcpt", 4, 0.0),
    ("data", 5, 0.0),
    ("accepted", 5, 0.02),  # marking the last of a batch, or claiming the next
    ("accepted", 5, 0.05),
    ("mail", 6, 0.0),  # the first message of a freshly claimed batch
    ("data", 7, 0.0),
    ("accepted", 10, 0.005),
]


@dataclass
class KillingSink(MailSink):
    """MailSink that sends SIGKILL to `pid` at the chosen event."""

    pid: int | None = None
    kill_at: tuple[str, int, float] | None = None
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    killed: threading.Event = field(default_factory=threading.Event)

    def arm(self, kill_at: tuple[str, int, float] | None) -> None:
        self.kill_at = kill_at
        self.counts.clear()
        self.killed.clear()
        self.pid = None

    def observe(self, event: str) -> None:
        self.counts[event] += 1
        if self.kill_at is None or self.pid is None:
            return
        wanted, occurrence, delay = self.kill_at
        if event != wanted or self.counts[event] != occurrence:
            return
        if delay:
            threading.Timer(delay, self.kill).start()
        else:
            self.kill()

    def kill(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self.killed.set()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.observe("ehlo")
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.observe("mail")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.observe("rcpt")
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # The message counts as received even when the client dies before
        # reading the 250: that is the in-flight message a rerun may repeat.
        self.observe("data")
        reply = await super().handle_DATA(server, session, envelope)
        self.observe("accepted")
        return reply


@pytest.fixture
def killing_server() -> Any:
    sink = KillingSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


def pending_rows(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count()).where(sent_notifications.c.status == "pending")
        ).scalar_one()
    engine.dispose()
    return int(count)


def expire_leases(url: str) -> None:
    """Stand in for the clock: age every claim past any lease."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sent_notifications.update()
            .where(sent_notifications.c.claimed_at.is_not(None))
            .values(claimed_at=datetime(2000, 1, 1))
        )
    engine.dispose()


def notification_rows(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sent_notifications)).mappings().all()
    engine.dispose()
    return {row["user_id"]: row for row in rows}


def test_killed_runs_lose_and_repeat_nothing(database_url: str, killing_server: Any, tmp_path: Path) -> None:
    sink, mail_url = killing_server
    create_users(database_url, [{"id": n, "email": f"u{n}@example.com", "points": 500} for n in range(1, USERS + 1)])
    upgrade(database_url)
    env = subprocess_env(
        tmp_path, POLLER_DATABASE_URL=database_url, POLLER_MAIL_URL=mail_url, POLLER_BATCH_SIZE=str(BATCH_SIZE)
    )
    poller = poller_executable()

    kills = 0
    left_pending = 0
    for point in KILL_POINTS:
        expire_leases(database_url)
        sink.arm(point)
        process = subprocess.Popen([poller, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sink.pid = process.pid
        _stdout, stderr = process.communicate(timeout=60)

        assert process.returncode == -signal.SIGKILL, f"{point}: {stderr.decode()}"
        kills += 1
        left_pending += pending_rows(database_url)

    # The last run is not killed; it takes over what the last crash left
    # once the lease has passed, here one second.
    sink.arm(None)
    time.sleep(1.1)
    final = subprocess.run([poller, "run", "--lease", "1"], env=env, capture_output=True, text=True, timeout=60)

    assert final.returncode == 0, final.stderr
    assert left_pending > 0
    rows = notification_rows(database_url)
    assert len(rows) == USERS
    assert {row["status"] for row in rows.values()} == {"sent"}
    copies: dict[str, list[str]] = collections.defaultdict(list)
    for item in sink.received:
        copies[item.recipients[0]].append(item.message["Message-ID"])
    assert sorted(copies) == sorted(f"u{n}@example.com" for n in range(1, USERS + 1))
    # Each crash has at most one message in flight, which may arrive twice
    # (or more often, if later runs die on the same message again).
    assert len(sink.received) > USERS
    assert len(sink.received) - USERS <= kills
    for user_id, row in rows.items():
        ids = copies[f"u{user_id}@example.com"]
        assert set(ids) == {row["message_id"]}, user_id
