"""Shared fixtures: a real SMTP server, real databases, a users table.

PostgreSQL and MariaDB tests run when POLLER_TEST_POSTGRESQL_URL or
POLLER_TEST_MYSQL_URL name a server; each test session creates its own
database there and drops it at the end. With POLLER_TEST_REQUIRE_SERVERS=1
(as .ci/run sets it) a missing server fails the tests instead of skipping
them.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from click.testing import CliRunner

from poller import migrate
from poller.cli import cli

BACKENDS = ("sqlite", "postgresql", "mysql")
SERVER_ENV = {"postgresql": "POLLER_TEST_POSTGRESQL_URL", "mysql": "POLLER_TEST_MYSQL_URL"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# SMTP ----------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class MailSink:
    """aiosmtpd handler that records accepted messages and sends the configured replies.

    `rcpt_replies` and `data_replies` map a recipient address to the reply
    the server gives at RCPT or after DATA instead of accepting it.
    """

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: SMTPProtocol, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        for address in envelope.rcpt_tos:
            reply = self.data_replies.get(address)
            if reply:
                return reply
        content = envelope.original_content or b""
        with self.lock:
            self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 Message accepted"

    def recipients(self) -> list[str]:
        with self.lock:
            return [address for item in self.received for address in item.recipients]


@dataclass
class SMTPServer:
    host: str
    port: int
    sink: MailSink

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


@pytest.fixture
def smtp_server() -> Iterator[SMTPServer]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 and a free port."""
    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SMTPServer("127.0.0.1", port, sink)
    finally:
        controller.stop()


# Databases -----------------------------------------------------------------


def _server_url(backend: str) -> str | None:
    return os.environ.get(SERVER_ENV[backend]) or None


@pytest.fixture(scope="session")
def server_databases() -> Iterator[dict[str, str]]:
    """Create one scratch database per server for this test session."""
    created: dict[str, str] = {}
    name = f"poller_test_{uuid.uuid4().hex[:8]}"
    for backend in ("postgresql", "mysql"):
        url = _server_url(backend)
        if url is None:
            continue
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        created[backend] = sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    yield created
    for backend in created:
        admin = sa.create_engine(_server_url(backend) or "", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            if backend == "postgresql":
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


def reset_database(url: str) -> None:
    """Drop every table, so each test starts from an empty database."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    metadata.reflect(engine)
    with engine.begin() as connection:
        for view in sa.inspect(connection).get_view_names():
            connection.exec_driver_sql(f"DROP VIEW {view}")
    metadata = sa.MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path, server_databases: dict[str, str]) -> str:
    """An empty database on each backend: a SQLite file, PostgreSQL, MariaDB."""
    backend = request.param
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url = server_databases.get(backend)
    if url is None:
        message = f"{SERVER_ENV[backend]} is not set"
        if os.environ.get("POLLER_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail(message + " but POLLER_TEST_REQUIRE_SERVERS=1")
        pytest.skip(message)
    reset_database(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


def create_users(url: str, rows: list[dict[str, Any]], *, table: str = "users", points_type: Any = sa.Integer) -> None:
    """Create the other application's users table with these rows."""
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    users = sa.Table(
        table,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(400)),
        sa.Column("points", points_type),
        sa.Column("name", sa.Text),
    )
    metadata.create_all(engine)
    if rows:
        full_rows = [{"name": None, **row} for row in rows]
        with engine.begin() as connection:
            connection.execute(users.insert(), full_rows)
    engine.dispose()


def upgrade(url: str) -> None:
    engine = sa.create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()


def notifications(url: str) -> list[dict[str, Any]]:
    """Every sent_notifications row, as dicts ordered by id."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT * FROM sent_notifications ORDER BY id").mappings().all()
    engine.dispose()
    return [dict(row) for row in rows]


@pytest.fixture
def app_db(database_url: str) -> str:
    """A migrated database with a users table of five users, three of them due."""
    create_users(
        database_url,
        [
            {"id": 1, "email": "ada@example.com", "points": 150, "name": "Ada"},
            {"id": 2, "email": "bob@example.com", "points": 99, "name": "Bob"},
            {"id": 3, "email": "cy@example.com", "points": 100, "name": "Cy"},
            {"id": 4, "email": "dee@example.com", "points": 2000, "name": "Dee"},
            {"id": 5, "email": "eve@example.com", "points": 0, "name": "Eve"},
        ],
    )
    upgrade(database_url)
    return database_url


# Running poller ------------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner: CliRunner, tmp_path: Path) -> Any:
    """Invoke the CLI in-process with a clean POLLER_* environment and a private lock file."""

    def call(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Any:
        clean = {key: None for key in os.environ if key.startswith("POLLER_") and not key.startswith("POLLER_TEST_")}
        clean["POLLER_LOCK_FILE"] = str(tmp_path / "poller.lock")
        clean.update(env or {})
        return runner.invoke(cli, list(args), env=clean, input=input, catch_exceptions=False)

    return call


def poller_executable() -> str:
    """The installed console script: beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "poller"
    if beside.exists():
        return str(beside)
    found = shutil.which("poller")
    if found is None:
        pytest.fail("The poller console script is not installed; run `pip install -e '.[test]'` first.")
    return found


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("POLLER_") or key.startswith("POLLER_TEST_")
    }
    env["POLLER_LOCK_FILE"] = str(tmp_path / "poller.lock")
    env.update(extra)
    return env


# Cron ----------------------------------------------------------------------


@pytest.fixture
def root_crontab() -> Iterator[None]:
    """Save the real crontab of the current user (root in CI) and restore it afterwards."""
    if shutil.which("crontab") is None:
        if os.environ.get("POLLER_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("The crontab program is missing; .ci/run installs Debian's cron package.")
        pytest.skip("The crontab program is missing; install Debian's cron package.")
    listed = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=False)
    saved = listed.stdout if listed.returncode == 0 else None
    try:
        yield
    finally:
        if saved is None:
            subprocess.run(["crontab", "-r"], capture_output=True, check=False)
        else:
            subprocess.run(["crontab", "-"], input=saved, text=True, check=True)
