"""Database connections, the users table, and migration state."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from poller.errors import ConfigError, DatabaseError
from poller.schema import HEAD_REVISION, VERSION_TABLE, sent_notifications
from poller.settings import Settings, redact_url

log = logging.getLogger(__name__)

# How long SQLite waits for another writer before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 30

SUPPORTED_URLS = "sqlite:////PATH, postgresql+psycopg://USER@HOST/DATABASE or mysql+pymysql://USER@HOST/DATABASE"

# How to install each driver module that SQLAlchemy may ask for. Poller is
# installed from a checkout, so the hints name the drivers' own packages
# and the checkout's extras rather than a poller package on an index.
INSTALL_PSYCOPG = "pip install 'psycopg[binary]', or pip install '.[postgresql]' in the poller checkout"
INSTALL_PYMYSQL = "pip install PyMySQL, or pip install '.[mysql]' in the poller checkout"
DRIVER_HINTS = {
    "psycopg": f"Install it with: {INSTALL_PSYCOPG}.",
    "psycopg2": f"Use postgresql+psycopg:// (psycopg 3) instead, installed with: {INSTALL_PSYCOPG}.",
    "pymysql": f"Install it with: {INSTALL_PYMYSQL}.",
    "MySQLdb": f"Use mysql+pymysql:// (PyMySQL) instead, installed with: {INSTALL_PYMYSQL}.",
}


def create_engine(url: str, *, must_exist: bool = True) -> Engine:
    """Create an engine for `url`, raising ConfigError or DatabaseError.

    A SQLite file that does not exist is an error unless `must_exist` is
    false, because SQLite would otherwise create an empty database silently.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"--database-url {redact_url(url)!r} is not a valid SQLAlchemy URL. "
            "Use a form such as sqlite:////var/lib/app.db or postgresql+psycopg://user@host/db."
        ) from None

    options: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:")
        if must_exist and not in_memory and not Path(database).exists():
            raise DatabaseError(
                f"SQLite database file {database!r} does not exist. Check --database-url; "
                "an absolute path needs four slashes: sqlite:////var/lib/app.db."
            )
        directory = Path(database).parent
        if not in_memory and not directory.is_dir():
            # SQLite creates the file but not its directory, and reports only
            # "unable to open database file".
            raise DatabaseError(
                f"The directory {str(directory)!r} of SQLite database file {database!r} does not exist. "
                "Create it, or fix --database-url; an absolute path needs four slashes: sqlite:////var/lib/app.db."
            )
        # A `?timeout=SECONDS` in the URL overrides the default busy timeout.
        if "timeout" not in parsed.query:
            options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
    else:
        # pre_ping replaces connections the server closed while we sent
        # mail, such as MySQL's after wait_timeout.
        options["pool_pre_ping"] = True
        options["pool_recycle"] = 1800

    try:
        return sa.create_engine(parsed, **options)
    except ModuleNotFoundError as exc:
        hint = DRIVER_HINTS.get(exc.name or "", "")
        raise ConfigError(
            f"The driver for {redact_url(url)!r} is not installed ({exc.name}). {hint}".rstrip()
        ) from None
    except sa.exc.NoSuchModuleError:
        raise ConfigError(
            f"--database-url {redact_url(url)!r} uses the unsupported database type {parsed.drivername!r}. "
            f"Use one of: {SUPPORTED_URLS}."
        ) from None
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"--database-url {redact_url(url)!r} is invalid: {exc}") from None


def describe_error(exc: BaseException, url: str) -> str:
    """Render a driver error as one line, with the URL's password removed."""
    original = getattr(exc, "orig", None) or exc
    text = " ".join(str(original).split())
    password = make_url(url).password
    if password:
        text = text.replace(str(password), "***")
    return text


@contextlib.contextmanager
def database_errors(url: str, action: str) -> Iterator[None]:
    """Turn SQLAlchemy's connection errors into DatabaseError naming the host."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseError(f"Database error while {action} at {redact_url(url)}: {describe_error(exc, url)}") from None


def sqlite_journal_mode(connection: sa.Connection) -> str:
    """Return SQLite's journal mode in lower case, such as "wal" or "delete"."""
    return str(connection.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()


def check_migrated(connection: sa.Connection) -> None:
    """Raise DatabaseError unless sent_notifications exists at the latest revision."""
    inspector = sa.inspect(connection)
    if not inspector.has_table(sent_notifications.name):
        raise DatabaseError(
            "The database has no sent_notifications table. Run `poller db upgrade` with the same --database-url first."
        )

    # Reading the version table directly spares every run the import of
    # Alembic (about 0.1 s); Alembic itself decides only when they differ.
    if inspector.has_table(VERSION_TABLE):
        stored = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()  # noqa: S608
        if stored == [HEAD_REVISION]:
            return

    from poller import migrate

    current = migrate.current_revision(connection)
    head = migrate.head_revision()
    if current != head:
        raise DatabaseError(
            f"The database is at migration {current!r} but this poller needs {head!r}. Run `poller db upgrade`."
        )


@dataclasses.dataclass(frozen=True)
class UsersTable:
    """The users table's columns as the settings name them."""

    table: sa.Table
    id: sa.ColumnElement[Any]
    email: sa.ColumnElement[Any]
    points: sa.ColumnElement[Any]
    name: sa.ColumnElement[Any] | None
    # True where SQLite compares points as text (TEXT or no column type),
    # so that the SQL filter cannot be trusted to compare numerically.
    points_compare_as_text: bool


def reflect_users(connection: sa.Connection, settings: Settings) -> UsersTable:
    """Reflect the configured users table or view, read-only.

    Raises ConfigError (exit 2) naming the missing table or column and the
    option that sets it, because the fix is a setting, not the database.
    """
    schema, _, name = settings.users_table.rpartition(".")
    try:
        table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=connection)
    except sa.exc.NoSuchTableError:
        raise ConfigError(
            f"Table or view {settings.users_table!r} not found in the database. "
            "Set --users-table (POLLER_USERS_TABLE) to the table that holds the users."
        ) from None

    def column(setting: str, option: str) -> sa.ColumnElement[Any]:
        wanted = settings.values[setting]
        if wanted not in table.c:
            found = ", ".join(table.c.keys())
            raise ConfigError(
                f"Table {settings.users_table!r} has no column {wanted!r} (its columns: {found}). "
                f"Set {option} to the right column."
            )
        found_column: sa.ColumnElement[Any] = table.c[wanted]
        return found_column

    id_column = column("id_column", "--id-column")
    email_column = column("email_column", "--email-column")
    points_column = column("points_column", "--points-column")

    name_column = None
    if settings.name_column:
        if settings.name_column in table.c:
            name_column = table.c[settings.name_column]
        elif settings.sources["name_column"] != "default":
            column("name_column", "--name-column")
        else:
            log.debug("Table %s has no column 'name'; messages will greet users by address", settings.users_table)

    as_text = False
    if connection.dialect.name == "sqlite":
        # SQLite gives a column INTEGER, REAL or NUMERIC affinity only from
        # its declared type; other columns compare '99' >= '100' as text.
        declared = str(points_column.type).upper() if not isinstance(points_column.type, sa.types.NullType) else ""
        numeric = any(word in declared for word in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC", "BOOL"))
        as_text = not numeric

    return UsersTable(table, id_column, email_column, points_column, name_column, as_text)
