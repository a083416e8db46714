"""Report runs to a heartbeat monitor with the healthchecks.io ping protocol.

The protocol: a request to URL/start when the run begins, then URL/0 on
success or URL/<exit code> (URL/fail when there is no exit code) at the
end, each with ?rid=<run id> so the monitor can pair start and end. A
monitor that is down, slow or returns an error only logs a warning: a
heartbeat must never fail or delay the run it reports. The check's URL
works as a password (anyone who has it can ping the check), so it is
logged with its path hidden.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

from poller.settings import redact_path_url

log = logging.getLogger(__name__)

# Seconds per request. Two requests per run, so a dead monitor adds at most
# twice this to a run.
TIMEOUT = 5.0

# Monitors such as healthchecks.io store the request body with the ping.
MAX_BODY_BYTES = 10_000


class Heartbeat:
    """The pings of one run: start, then exactly one end signal."""

    def __init__(self, url: str, *, run_id: str | None = None, timeout: float | None = None) -> None:
        self.url = url
        self.run_id = run_id or str(uuid.uuid4())
        self.timeout = TIMEOUT if timeout is None else timeout
        self.exit_code: int | None = 0
        self.summary = ""

    def endpoint(self, signal: str) -> str:
        """Return URL/<signal>?rid=<run id>, keeping any query the URL already has."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/") + "/" + signal
        query = "&".join(item for item in (parts.query, urlencode({"rid": self.run_id})) if item)
        return urlunsplit((parts.scheme, parts.netloc, path, query, ""))

    def ping(self, signal: str, body: str = "") -> bool:
        """Send one ping; return whether the monitor returned 2xx.

        Network, HTTP and URL errors are logged as warnings, not raised.
        """
        request = urllib.request.Request(  # noqa: S310 - the URL was checked to be http or https
            self.endpoint(signal),
            data=body.encode("utf-8")[:MAX_BODY_BYTES],
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": "poller"},
        )
        redacted = redact_path_url(self.url)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                response.read(1024)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.warning("Heartbeat ping %r to %s failed (%s); the run goes on", signal, redacted, self.describe(exc))
            return False
        log.debug("Heartbeat ping %r to %s sent (run id %s)", signal, redacted, self.run_id)
        return True

    def describe(self, exc: BaseException) -> str:
        """Render a ping error without the URL, which urllib's messages can repeat."""
        if isinstance(exc, urllib.error.HTTPError):
            return f"HTTP {exc.code} {exc.reason}"
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return f"timed out after {self.timeout:g} s"
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror
        return type(reason).__name__ if isinstance(reason, BaseException) else str(reason)

    def start(self) -> None:
        self.ping("start")

    def finish(self) -> None:
        signal = "fail" if self.exit_code is None else str(self.exit_code)
        self.ping(signal, self.summary)


@contextlib.contextmanager
def reporting(url: str | None) -> Iterator[Heartbeat | None]:
    """Ping start on entry and the outcome on exit; yield None when no URL is set.

    The caller sets `exit_code` and `summary` on the Heartbeat before a
    normal exit. An exception reports its exit code when it carries one
    (SystemExit, click and poller errors) and `fail` otherwise, for example
    after Ctrl-C or SIGTERM.
    """
    if url is None:
        yield None
        return

    heartbeat = Heartbeat(url)
    heartbeat.start()
    try:
        yield heartbeat
    except SystemExit as exc:
        heartbeat.exit_code = exc.code if isinstance(exc.code, int) else 1
        heartbeat.finish()
        raise
    except BaseException as exc:
        code = getattr(exc, "exit_code", None)
        heartbeat.exit_code = code if isinstance(code, int) else None
        heartbeat.summary = heartbeat.summary or str(exc)
        heartbeat.finish()
        raise
    heartbeat.finish()
