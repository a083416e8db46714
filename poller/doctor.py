"""`poller doctor`: check the setup a scheduled run depends on, without sending anything."""

from __future__ import annotations

import dataclasses
import enum
import io
import logging
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from poller import cron, db, indexes, run_command
from poller.errors import PollerError
from poller.settings import Settings

log = logging.getLogger(__name__)


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome of one check, printed as one line."""

    status: Status
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status.value:<4}  {self.name}: {self.detail}"


def check_database(settings: Settings) -> Iterator[Check]:
    """Check that the database is reachable and migrated, the users table, and its points index."""
    try:
        engine = db.create_engine(settings.database_url)
    except PollerError as exc:
        yield Check(Status.FAIL, "database", str(exc))
        return

    try:
        with db.database_errors(settings.database_url, "connecting"), engine.connect() as connection:
            try:
                db.check_migrated(connection)
            except PollerError as exc:
                yield Check(Status.FAIL, "database", str(exc))
            else:
                yield Check(Status.OK, "database", "reachable, and sent_notifications is at the latest migration")

            try:
                users = db.reflect_users(connection, settings)
            except PollerError as exc:
                yield Check(Status.FAIL, "users table", str(exc))
                return
            columns = [
                column.name for column in (users.id, users.email, users.points, users.name) if column is not None
            ]
            yield Check(Status.OK, "users table", f"{settings.users_table!r} has the columns {', '.join(columns)}")
            yield _check_points_index(connection, users)
    except PollerError as exc:
        yield Check(Status.FAIL, "database", str(exc))
    finally:
        engine.dispose()


def _check_points_index(connection: sa.Connection, users: db.UsersTable) -> Check:
    try:
        warning = indexes.points_index_warning(connection, users)
    except (sa.exc.SQLAlchemyError, NotImplementedError) as exc:
        return Check(Status.WARN, "points index", f"cannot list the indexes of {users.table.fullname!r}: {exc}")
    if warning is not None:
        return Check(Status.WARN, "points index", warning)
    return Check(Status.OK, "points index", f"{users.table.fullname}.{users.points.name} is indexed")


def check_config_file(settings: Settings) -> Check | None:
    """Warn, as `cron install` does, when the config file exposes a password to other users."""
    warning = run_command.exposed_config_password(settings)
    if warning is not None:
        return Check(Status.WARN, "config file", warning)
    if settings.config_path is None:
        return None
    return Check(Status.OK, "config file", "contains no password, or other users cannot read it")


def check_mail(settings: Settings) -> Check:
    """Connect to the mail backend and greet it (EHLO for SMTP); send nothing."""
    from poller.mail import backend_factory

    try:
        backend = backend_factory(settings, io.StringIO())()
        detail = backend.check()
    except PollerError as exc:
        return Check(Status.FAIL, "mail", str(exc))
    return Check(Status.OK, "mail", detail)


def check_cron(target: cron.Target, name: str) -> Check:
    """Check that the installed cron line runs an existing executable with an existing config."""
    try:
        text = cron.read_crontab(target)
    except PollerError as exc:
        return Check(Status.WARN, "cron line", f"cannot read the {target.label()}: {exc}")

    entries = [entry for _, entry in cron.find_entries(text, name, target.is_file)]
    if not entries:
        return Check(
            Status.WARN,
            "cron line",
            f"no poller line named {name!r} in the {target.label()}; install one with: poller cron install",
        )
    entry = entries[0]
    if not entry.enabled:
        return Check(Status.FAIL, "cron line", f"the line named {name!r} is commented out, so cron never runs it")

    try:
        words = shlex.split(entry.command, comments=True)
    except ValueError as exc:
        return Check(Status.FAIL, "cron line", f"cannot parse the command {entry.command!r}: {exc}")
    executable = Path(words[0]) if words else Path()
    if not executable.is_absolute() or not executable.is_file() or not os.access(executable, os.X_OK):
        return Check(
            Status.FAIL,
            "cron line",
            f"runs {str(executable)!r}, which is not an executable file; reinstall with poller cron install",
        )
    if "--config" in words[:-1]:
        config = Path(words[words.index("--config") + 1])
        if not config.is_file():
            return Check(
                Status.FAIL,
                "cron line",
                f"uses config file {str(config)!r}, which does not exist; reinstall with poller cron install",
            )
    return Check(Status.OK, "cron line", f"{entry.schedule} runs {executable}")
