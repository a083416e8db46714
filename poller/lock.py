"""The lock file that keeps runs on one host from overlapping.

The kernel drops an flock when its holder dies, so a crashed run can never
leave a stale lock behind. The database claims remain the guarantee across
hosts; this lock only saves overlapping cron runs from racing each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from types import TracebackType

from poller.errors import ConfigError, LockBusy

log = logging.getLogger(__name__)


def canonical_database(url: str) -> str:
    """Return the URL with a SQLite path made absolute, so every cwd maps one database to one lock."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path, _, query = url[len("sqlite:///") :].partition("?")
        if path and path != ":memory:":
            absolute = "sqlite:///" + str(Path(path).resolve())
            return absolute + ("?" + query if query else "")
    return url


def lock_directory() -> Path:
    """$XDG_RUNTIME_DIR when set, else /run/lock, else the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime)
    for candidate in ("/run/lock", "/var/lock"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def default_lock_path(database_url: str) -> Path:
    digest = hashlib.sha256(canonical_database(database_url).encode("utf-8")).hexdigest()[:16]
    return lock_directory() / f"poller-{digest}.lock"


class RunLock:
    """An exclusive, non-blocking flock, optionally retried for `wait` seconds."""

    def __init__(self, path: Path, wait: float = 0.0) -> None:
        self.path = path
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"Cannot open lock file {str(self.path)!r}: {exc.strerror}. Set --lock-file to a writable path."
            ) from None

        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = self._holder()
                    waited = f" after waiting {self.wait:g} s" if self.wait else ""
                    raise LockBusy(
                        f"Another poller run{holder} holds {str(self.path)!r}{waited}; not starting."
                    ) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

        # The pid is informational only: the flock is what excludes.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        log.debug("Holding lock %s", self.path)

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
