"""--ping-url against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from poller import heartbeat
from tests.conftest import SMTPServer, free_port

CHECK = "0b4f2a6e-8c1d-4e5f-9a7b-3c2d1e0f9a8b"


@dataclass
class Monitor:
    """A heartbeat monitor: records each ping, answers `status` after `delay` seconds."""

    port: int
    pings: list[tuple[str, dict[str, list[str]], str]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{CHECK}"

    def signals(self) -> list[str]:
        return [path.rpartition("/")[2] for path, _query, _body in self.pings]

    def run_ids(self) -> set[str]:
        return {query["rid"][0] for _path, query, _body in self.pings}


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    state = Monitor(free_port())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8")
            parts = urlsplit(self.path)
            state.pings.append((parts.path, parse_qs(parts.query), body))
            time.sleep(state.delay)
            try:
                self.send_response(state.status)
                self.end_headers()
                self.wfile.write(b"OK")
            except BrokenPipeError:
                pass  # the client gave up waiting, as the slow-monitor test intends

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def run_args(database_url: str, smtp: SMTPServer, ping_url: str, *extra: str) -> list[str]:
    return ["run", "--database-url", database_url, "--mail-url", smtp.url, "--ping-url", ping_url, *extra]


def test_success_pings_start_then_zero(invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor) -> None:
    result = invoke(*run_args(app_db, smtp_server, monitor.url))

    assert result.exit_code == 0, result.output
    assert monitor.signals() == ["start", "0"]
    assert all(path.startswith(f"/{CHECK}/") for path, _query, _body in monitor.pings)
    assert len(monitor.run_ids()) == 1
    assert "sent 3" in monitor.pings[1][2]


def test_failed_notification_pings_exit_code(
    invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor
) -> None:
    smtp_server.sink.rcpt_replies["cy@example.com"] = "550 5.1.1 No such mailbox"

    result = invoke(*run_args(app_db, smtp_server, monitor.url))

    assert result.exit_code == 1
    assert monitor.signals() == ["start", "1"]


def test_unmigrated_database_pings_exit_code(
    invoke: Any, sqlite_url: str, smtp_server: SMTPServer, monitor: Monitor
) -> None:
    from tests.conftest import create_users

    create_users(sqlite_url, [{"id": 1, "email": "a@example.com", "points": 500}])

    result = invoke(*run_args(sqlite_url, smtp_server, monitor.url))

    assert result.exit_code == 1
    assert monitor.signals() == ["start", "1"]
    assert "poller db upgrade" in monitor.pings[1][2]


def test_each_run_has_own_run_id(invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor) -> None:
    invoke(*run_args(app_db, smtp_server, monitor.url))
    invoke(*run_args(app_db, smtp_server, monitor.url))

    assert monitor.signals() == ["start", "0", "start", "0"]
    assert len(monitor.run_ids()) == 2


def test_monitor_down_does_not_fail_run(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    down = f"http://127.0.0.1:{free_port()}/{CHECK}"

    result = invoke(*run_args(app_db, smtp_server, down))

    assert result.exit_code == 0, result.output
    assert len(smtp_server.sink.received) == 3
    assert "Heartbeat ping 'start' to http://127.0.0.1" in result.stderr
    assert "(Connection refused)" in result.stderr
    assert CHECK not in result.stderr


def test_monitor_error_does_not_fail_run(invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor) -> None:
    monitor.status = 500

    result = invoke(*run_args(app_db, smtp_server, monitor.url))

    assert result.exit_code == 0, result.output
    assert monitor.signals() == ["start", "0"]
    assert "failed (HTTP 500 Internal Server Error)" in result.stderr
    assert CHECK not in result.stderr


def test_slow_monitor_times_out(
    invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heartbeat, "TIMEOUT", 0.2)
    monitor.delay = 1.0

    started = time.monotonic()
    result = invoke(*run_args(app_db, smtp_server, monitor.url))
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.output
    assert len(smtp_server.sink.received) == 3
    assert "timed out after 0.2 s" in result.stderr
    assert elapsed < 2 * monitor.delay


def test_dry_run_does_not_ping(invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor) -> None:
    result = invoke(*run_args(app_db, smtp_server, monitor.url, "--dry-run"))

    assert result.exit_code == 0
    assert monitor.pings == []


def test_busy_lock_does_not_ping(
    invoke: Any, app_db: str, smtp_server: SMTPServer, monitor: Monitor, tmp_path: Path
) -> None:
    from poller.lock import RunLock

    lock_path = tmp_path / "held.lock"
    holder = RunLock(lock_path)
    holder.acquire()
    try:
        result = invoke(*run_args(app_db, smtp_server, monitor.url, "--lock-file", str(lock_path)))
    finally:
        holder.release()

    assert result.exit_code == 75
    assert monitor.pings == []


def test_non_http_ping_url_is_usage_error(invoke: Any, app_db: str, smtp_server: SMTPServer) -> None:
    result = invoke(*run_args(app_db, smtp_server, f"ftp://monitor.example/{CHECK}"))

    assert result.exit_code == 2
    assert "--ping-url" in result.stderr
    assert CHECK not in result.stderr


def test_endpoint_keeps_query_and_adds_run_id() -> None:
    beat = heartbeat.Heartbeat("https://monitor.example/ping/key/slug?create=1", run_id="abc")

    assert beat.endpoint("start") == "https://monitor.example/ping/key/slug/start?create=1&rid=abc"
