"""`poller run` against SMTP servers that refuse, defer, drop, stall or reject the setup."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from poller.schema import sent_notifications
from poller.store import utcnow
from tests.conftest import MailSink, SMTPServer, free_port

SENDER = "Game <game@example.com>"
DUE = ["ada@example.com", "cy@example.com", "dee@example.com"]


def run_args(database_url: str, mail_url: str, *extra: str) -> list[str]:
    return ["run", "--database-url", database_url, "--mail-url", mail_url, "--from", SENDER, *extra]


def rows_by_user(url: str) -> dict[str, dict[str, Any]]:
    """Every sent_notifications row keyed by user id, with timestamps as datetimes."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sent_notifications)).mappings().all()
    engine.dispose()
    return {row["user_id"]: dict(row) for row in rows}


def move_retries_due(url: str) -> None:
    """Stand in for the clock: make every deferred row due now."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sent_notifications.update()
            .where(sent_notifications.c.next_attempt_at.is_not(None))
            .values(next_attempt_at=datetime(2000, 1, 1))
        )
    engine.dispose()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


# Transient and permanent replies from aiosmtpd ------------------------------


@pytest.mark.parametrize("code", ["421 4.3.2 Try later", "450 4.2.0 Busy", "451 4.3.0 Error", "452 4.2.2 Full"])
def test_transient_reply_retries_with_backoff(invoke: Any, app_db: str, smtp_server: SMTPServer, code: str) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = code
    args = run_args(app_db, smtp_server.url, "--max-attempts", "3", "--retry-backoff", "60")

    for attempt in (1, 2):
        before = utcnow()
        result = invoke(*args)
        after = utcnow()

        assert result.exit_code == 1, result.output
        row = rows_by_user(app_db)["3"]
        assert row["status"] == "pending"
        assert row["attempts"] == attempt
        assert row["claim_token"] is None
        assert row["last_error"] == " ".join(code.split())
        delay = timedelta(seconds=60 * 2 ** (attempt - 1))
        assert before + delay <= row["next_attempt_at"] <= after + delay + timedelta(seconds=1)

        # Before the backoff passes, a run leaves the row alone.
        waiting = invoke(*args)
        assert waiting.exit_code == 0
        assert rows_by_user(app_db)["3"]["attempts"] == attempt
        move_retries_due(app_db)

    final = invoke(*args)

    assert final.exit_code == 1
    row = rows_by_user(app_db)["3"]
    assert row["status"] == "failed"
    assert row["attempts"] == 3
    assert row["last_error"] == f"gave up after 3 attempts; last error: {' '.join(code.split())}"
    assert sorted(smtp_server.sink.recipients()) == ["ada@example.com", "dee@example.com"]
    move_retries_due(app_db)
    assert invoke(*args).exit_code == 0
    assert rows_by_user(app_db)["3"]["attempts"] == 3


@pytest.mark.parametrize(
    "code", ["550 5.1.1 No such mailbox", "551 5.1.6 User moved", "553 5.1.3 Bad address", "554 5.7.1 Rejected"]
)
@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_permanent_reply_fails_one_recipient(
    invoke: Any, app_db: str, smtp_server: SMTPServer, code: str, stage: str
) -> None:
    replies = smtp_server.sink.rcpt_replies if stage == "rcpt" else smtp_server.sink.data_replies
    replies["cy@example.com"] = code

    result = invoke(*run_args(app_db, smtp_server.url))

    assert result.exit_code == 1
    assert sorted(smtp_server.sink.recipients()) == ["ada@example.com", "dee@example.com"]
    rows = rows_by_user(app_db)
    assert rows["3"]["status"] == "failed"
    assert rows["3"]["last_error"] == code
    assert rows["3"]["attempts"] == 1
    assert rows["1"]["status"] == "sent"
    assert rows["4"]["status"] == "sent"

    move_retries_due(app_db)
    rerun = invoke(*run_args(app_db, smtp_server.url))
    assert rerun.exit_code == 0
    assert len(smtp_server.sink.received) == 2


# Connection-level faults from a scripted server ----------------------------


@dataclass
class ScriptedSMTP:
    """A plain-socket SMTP server on 127.0.0.1 that can drop or stall on cue.

    `drop` is called with (event, connection number) for each event
    ("greeting", "mail", "rcpt:<address>", "data-end", "quit") and returns
    True to close the socket instead of replying. `stall` is called the same
    way for "mail" and "data-end" and returns True to go silent instead,
    keeping the connection open until the client leaves.
    """

    drop: Callable[[str, int], bool] = lambda event, connection: False
    stall: Callable[[str, int], bool] = lambda event, connection: False
    port: int = 0
    accepted: list[str] = field(default_factory=list)  # recipients of messages answered with 250
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.listener.close()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(client, number), daemon=True).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        with client, client.makefile("rwb") as stream:
            if self.drop("greeting", number):
                # Hold the connection open without greeting until the client leaves.
                stream.read()
                return
            stream.write(b"220 scripted ESMTP\r\n")
            stream.flush()
            recipient = ""
            while line := stream.readline():
                command = line.decode("ascii", "replace").strip()
                verb = command[:4].upper()
                if verb == "EHLO":
                    reply = b"250-scripted\r\n250 8BITMIME\r\n"
                elif verb == "MAIL":
                    if self.stall("mail", number):
                        stream.read()
                        return
                    if self.drop("mail", number):
                        return
                    reply = b"250 OK\r\n"
                elif verb == "RCPT":
                    recipient = command.partition(":")[2].strip().strip("<>")
                    if self.drop(f"rcpt:{recipient}", number):
                        return
                    reply = b"250 OK\r\n"
                elif verb == "DATA":
                    stream.write(b"354 Go ahead\r\n")
                    stream.flush()
                    while stream.readline() not in (b".\r\n", b""):
                        pass
                    if self.stall("data-end", number):
                        stream.read()
                        return
                    if self.drop("data-end", number):
                        return
                    with self.lock:
                        self.accepted.append(recipient)
                    reply = b"250 Accepted\r\n"
                elif verb == "QUIT":
                    if self.drop("quit", number):
                        return
                    stream.write(b"221 Bye\r\n")
                    stream.flush()
                    return
                else:
                    reply = b"250 OK\r\n"
                stream.write(reply)
                stream.flush()


@pytest.fixture
def scripted() -> Iterator[ScriptedSMTP]:
    server = ScriptedSMTP()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sent_emails(url: str) -> list[str]:
    return sorted(row["email"] for row in rows_by_user(url).values() if row["status"] == "sent")


def test_drop_before_data_reconnects_and_continues(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    # The first connection drops when the second message starts.
    mails = {"count": 0}

    def drop(event: str, connection: int) -> bool:
        if event == "mail":
            mails["count"] += 1
            return mails["count"] == 2
        return False

    scripted.drop = drop

    result = invoke(*run_args(app_db, scripted.url))

    assert result.exit_code == 0, result.output
    assert sorted(scripted.accepted) == DUE
    assert scripted.connections == 2
    assert sent_emails(app_db) == DUE


def test_drop_during_data_defers_that_message(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    scripted.drop = lambda event, connection: event == "data-end" and connection == 1

    result = invoke(*run_args(app_db, scripted.url, "--json"))

    assert result.exit_code == 1
    assert sorted(scripted.accepted) == ["cy@example.com", "dee@example.com"]
    assert sent_emails(app_db) == ["cy@example.com", "dee@example.com"]
    row = rows_by_user(app_db)["1"]
    assert row["status"] == "pending"
    assert row["last_error"].startswith("connection lost during DATA")


def test_recipient_that_always_drops_is_deferred(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    scripted.drop = lambda event, connection: event == "rcpt:cy@example.com"

    result = invoke(*run_args(app_db, scripted.url))

    assert result.exit_code == 1
    assert sorted(scripted.accepted) == ["ada@example.com", "dee@example.com"]
    assert sent_emails(app_db) == ["ada@example.com", "dee@example.com"]
    row = rows_by_user(app_db)["3"]
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["last_error"].startswith("connection dropped before DATA")


def test_drop_while_quitting_counts_as_delivered(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    scripted.drop = lambda event, connection: event == "quit"

    result = invoke(*run_args(app_db, scripted.url))

    assert result.exit_code == 0, result.output
    assert sent_emails(app_db) == DUE
    assert sorted(scripted.accepted) == DUE


def test_server_that_never_greets_times_out(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    scripted.drop = lambda event, connection: event == "greeting"

    result = invoke(*run_args(app_db, scripted.url, "--smtp-timeout", "1"))

    assert result.exit_code == 1
    assert "Timed out after 1 s" in result.stderr
    assert "--smtp-timeout" in result.stderr
    assert rows_by_user(app_db) == {}


def test_server_stalling_before_data_stops_run(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    # A silent server is not reconnected to: each attempt would cost a full timeout.
    scripted.stall = lambda event, connection: event == "mail"

    result = invoke(*run_args(app_db, scripted.url, "--smtp-timeout", "1"))

    assert result.exit_code == 1
    assert "did not respond within 1 s before DATA" in result.stderr
    assert scripted.connections == 1
    rows = rows_by_user(app_db)
    assert all(row["status"] == "pending" for row in rows.values())
    assert all(row["claim_token"] is None for row in rows.values())
    assert all(row["attempts"] == 0 for row in rows.values())


def test_server_stalling_after_data_stops_run(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    # Every DATA goes unanswered: both messages are deferred, and the
    # second timeout in a row ends the run instead of costing one timeout
    # per due user. The third user's claim is released untouched.
    scripted.stall = lambda event, connection: event == "data-end"

    result = invoke(*run_args(app_db, scripted.url, "--smtp-timeout", "1"))

    assert result.exit_code == 1
    assert "did not confirm 2 messages in a row" in result.stderr
    assert scripted.connections == 2
    rows = rows_by_user(app_db)
    assert sent_emails(app_db) == []
    assert sorted(row["attempts"] for row in rows.values()) == [0, 1, 1]
    assert all(row["claim_token"] is None for row in rows.values())
    assert "deferred 2" in result.stderr
    assert "released unsent 1" in result.stderr


# Setup faults: TLS mode, certificates, STARTTLS, credentials ---------------


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, made with the openssl program."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Certificate(cert, key)


@pytest.fixture
def aiosmtpd_server() -> Iterator[Callable[..., SMTPServer]]:
    """Start aiosmtpd servers with extra options (TLS, STARTTLS, AUTH); stop them afterwards."""
    controllers: list[Controller] = []

    def start(**options: Any) -> SMTPServer:
        sink = MailSink()
        port = free_port()
        controller = Controller(sink, hostname="127.0.0.1", port=port, **options)
        controller.start()
        controllers.append(controller)
        return SMTPServer("127.0.0.1", port, sink)

    yield start
    for controller in controllers:
        controller.stop()


def reject_login(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    return AuthResult(success=False, handled=False)


def assert_setup_fault(result: Any, database_url: str, setting: str) -> None:
    assert result.exit_code == 1, result.output
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert setting in errors[0]
    assert "Traceback" not in result.stderr
    assert rows_by_user(database_url) == {}


def test_smtps_against_starttls_server(
    invoke: Any, app_db: str, certificate: Certificate, aiosmtpd_server: Callable[..., SMTPServer]
) -> None:
    server = aiosmtpd_server(tls_context=certificate.server_context(), require_starttls=True)

    result = invoke(*run_args(app_db, f"smtps://127.0.0.1:{server.port}", "--smtp-ca-file", str(certificate.cert)))

    assert_setup_fault(result, app_db, "smtp+starttls://")
    assert server.sink.received == []


def test_starttls_against_implicit_tls_server(
    invoke: Any, app_db: str, certificate: Certificate, aiosmtpd_server: Callable[..., SMTPServer]
) -> None:
    server = aiosmtpd_server(ssl_context=certificate.server_context())

    result = invoke(
        *run_args(
            app_db,
            f"smtp+starttls://127.0.0.1:{server.port}",
            "--smtp-ca-file",
            str(certificate.cert),
            "--smtp-timeout",
            "1",
        )
    )

    assert_setup_fault(result, app_db, "smtps://")
    assert server.sink.received == []


def test_implicit_tls_with_private_ca_delivers(
    invoke: Any, app_db: str, certificate: Certificate, aiosmtpd_server: Callable[..., SMTPServer]
) -> None:
    server = aiosmtpd_server(ssl_context=certificate.server_context())

    result = invoke(*run_args(app_db, f"smtps://127.0.0.1:{server.port}", "--smtp-ca-file", str(certificate.cert)))

    assert result.exit_code == 0, result.output
    assert sorted(server.sink.recipients()) == DUE


def test_untrusted_certificate_is_rejected(
    invoke: Any, app_db: str, certificate: Certificate, aiosmtpd_server: Callable[..., SMTPServer]
) -> None:
    server = aiosmtpd_server(tls_context=certificate.server_context(), require_starttls=True)

    result = invoke(*run_args(app_db, f"smtp+starttls://127.0.0.1:{server.port}"))

    assert_setup_fault(result, app_db, "--smtp-ca-file")
    assert "failed verification" in result.stderr
    assert server.sink.received == []


def test_starttls_required_but_not_offered(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, f"smtp+starttls://127.0.0.1:{smtp_server.port}"))

    assert_setup_fault(result, app_db, "--mail-url")
    assert "does not offer STARTTLS" in result.stderr
    assert smtp_server.sink.received == []


def test_rejected_credentials(invoke: Any, app_db: str, aiosmtpd_server: Callable[..., SMTPServer]) -> None:
    server = aiosmtpd_server(authenticator=reject_login, auth_require_tls=False)

    result = invoke(
        *run_args(app_db, f"smtp://poller@127.0.0.1:{server.port}"),
        env={"POLLER_SMTP_PASSWORD": "wrong-Pa55"},
    )

    assert_setup_fault(result, app_db, "POLLER_SMTP_PASSWORD")
    assert "rejected the credentials for user 'poller'" in result.stderr
    assert "wrong-Pa55" not in result.stderr
    assert server.sink.received == []


def test_server_dropping_every_message_stops_run(invoke: Any, app_db: str, scripted: ScriptedSMTP) -> None:
    scripted.drop = lambda event, connection: event.startswith("rcpt:")

    result = invoke(*run_args(app_db, scripted.url))

    assert result.exit_code == 1
    assert "for two messages in a row" in result.stderr
    assert scripted.accepted == []
    rows = rows_by_user(app_db)
    assert rows["1"]["attempts"] == 1
    assert rows["3"]["attempts"] == 0
    assert {row["status"] for row in rows.values()} == {"pending"}
    assert {row["claim_token"] for row in rows.values()} == {None}
