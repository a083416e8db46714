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
import re
import time
from pathlib import Path
from types import TracebackType

from poller.errors import ConfigError, LockBusy

log = logging.getLogger(__name__)


SQLITE_RELATIVE = re.compile(r"(sqlite(?:\+\w+)?):///(?!/)")


def canonical_database(url: str) -> str:
    """Return the URL with a SQLite path made absolute, so every cwd maps one database to one lock."""
    match = SQLITE_RELATIVE.match(url)
    if match:
        path, _, query = url[match.end() :].partition("?")
        if path and path != ":memory:":
            absolute = f"{match.group(1)}:///" + str(Path(path).resolve())
            return absolute + ("?" + query if query else "")
    return url


def lock_directory() -> Path:
    """Return the system lock directory if writable, else $XDG_RUNTIME_DIR.

    The system directory comes first because cron sets no XDG_RUNTIME_DIR:
    a run from a login shell and one from cron must pick the same file.
    The working directory is never used, because cron's is the home
    directory while a shell's is anywhere.
    """
    candidates = ["/run/lock", "/var/lock", os.environ.get("XDG_RUNTIME_DIR", "")]
    for candidate in candidates:
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    raise ConfigError(
        "No writable lock directory: neither /run/lock, /var/lock nor $XDG_RUNTIME_DIR is writable. "
        "Set --lock-file (POLLER_LOCK_FILE) to a path this user can write."
    )


def default_lock_path(database_url: str) -> Path:
    """Return the lock file for this database and user.

    The user id is part of the name, so that a lock file created by another
    user in the shared directory cannot lock this user out.
    """
    digest = hashlib.sha256(canonical_database(database_url).encode("utf-8")).hexdigest()[:16]
    return lock_directory() / f"poller-{os.getuid()}-{digest}.lock"


class RunLock:
    """An exclusive, non-blocking flock, optionally retried for `wait` seconds."""

    def __init__(self, path: Path, wait: float = 0.0) -> None:
        self.path = path
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            # O_NOFOLLOW: in a world-writable lock directory, a symlink planted
            # by another user must not make us truncate the file it points to.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
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
                        f"Another poller run{holder} is active and holds the lock file {str(self.path)!r}{waited}; not starting."
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
