"""The click layer: parse options, build settings, call one function, report.

Heavy imports (SQLAlchemy, Alembic) happen inside the commands that need
them, so that `poller --help` and `poller cron show` start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from poller import __version__
from poller.errors import EXIT_FAILURE, EXIT_TEMPFAIL, EXIT_USAGE, PollerError
from poller.settings import SETTINGS, SETTINGS_BY_NAME, Settings, load_settings, select_rules

log = logging.getLogger("poller")

F = TypeVar("F", bound=Callable[..., Any])

# Defaults longer than this show as "(built in)" in --help.
HELP_DEFAULT_WIDTH = 40

EXIT_CODES_HELP = """
\b
Exit codes:
  0   everything due was sent, or nothing was due
  1   a notification failed or was deferred, or the run could not
      finish (database or mail server unreachable)
  2   invalid usage or configuration, including a users table or
      column that does not exist
  75  another run holds the lock file
"""


class ConfigFailure(click.ClickException):
    exit_code = EXIT_USAGE


class LockFailure(click.ClickException):
    exit_code = EXIT_TEMPFAIL


# click reads the exit code from the exception's class.
CLICK_EXCEPTIONS: dict[int, type[click.ClickException]] = {EXIT_USAGE: ConfigFailure, EXIT_TEMPFAIL: LockFailure}


@contextlib.contextmanager
def errors_to_exit_codes() -> Iterator[None]:
    """Turn poller's exceptions into click errors: one line on stderr and the exit code."""
    try:
        yield
    except PollerError as exc:
        log.debug("Stopping on %s", type(exc).__name__, exc_info=True)
        raise CLICK_EXCEPTIONS.get(exc.exit_code, click.ClickException)(str(exc)) from None


def configure_logging(verbose: int, quiet: bool) -> None:
    """Send log records to stderr: ERROR only with --quiet, DEBUG with -v."""
    if quiet:
        level = logging.ERROR
    elif verbose:
        level = logging.DEBUG
    else:
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("poller")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if verbose > 1:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
        logging.getLogger("sqlalchemy.engine").addHandler(handler)


def common_options(func: F) -> F:
    """--config, --verbose and --quiet, shared by every command that reads settings."""
    func = click.option("-q", "--quiet", is_flag=True, help="Print nothing unless something failed (for cron).")(func)
    func = click.option("-v", "--verbose", count=True, help="Log debug detail; twice also logs SQL.")(func)
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML config file. Default: $POLLER_CONFIG, if set.",
    )(func)
    return func


def settings_options(names: tuple[str, ...] | None = None) -> Callable[[F], F]:
    """Add one option per setting in SETTINGS (or only `names`)."""

    def decorate(func: F) -> F:
        for setting in reversed(SETTINGS):
            if setting.flag is None or (names is not None and setting.name not in names):
                continue
            # A setting without a fixed default describes its fallback in its help.
            default = "" if setting.default is None else f"; default: {help_default(setting.default)}"
            help_text = f"{setting.help} [env {setting.env}{default}]"
            func = click.option(
                setting.flag,
                setting.name,
                default=None,
                help=help_text,
                show_default=False,
                metavar=setting.value_name,
            )(func)
        return func

    return decorate


def help_default(default: Any) -> str:
    """Render a setting's default for --help, as docs/configuration.md shows it."""
    if default is None:
        return "none"
    if isinstance(default, float):
        return f"{default:g}"
    text = str(default)
    # A cut template would look like the real default, so long ones get a placeholder.
    if "\n" in text or len(text) > HELP_DEFAULT_WIDTH:
        return "(built in)"
    return text


def build_settings(params: dict[str, Any]) -> Settings:
    """Load settings from the command's parameters; pop the ones that are settings."""
    options = {name: params.pop(name) for name in list(params) if name in SETTINGS_BY_NAME}
    config_path = params.pop("config_path", None)
    configure_logging(params.pop("verbose", 0), params.pop("quiet", False))
    return load_settings(options, config_path=config_path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="poller")
def cli() -> None:
    """Email each user whose points reach a threshold, once.

    Configure with options, POLLER_* environment variables or a TOML file
    (--config); run `poller db upgrade` once, then schedule `poller run`.
    """


@cli.command(epilog=EXIT_CODES_HELP)
@common_options
@settings_options()
@click.option(
    "--dry-run", is_flag=True, help="List who would be notified and render their messages; write and send nothing."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Notify at most this many users in this run.")
@click.option("--rule", "rule_name", default=None, help="Run only the rule of this name.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object with the counts on stdout; on failure it also has error and exit_code.",
)
@click.option(
    "--wait-lock",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds to wait for another run to finish. [default: 0]",
)
def run(**params: Any) -> None:
    """Notify every user who reached the threshold and was not notified yet.

    Each notification is claimed in the database before its message leaves,
    and marked sent only after the server accepted it, so reruns and
    overlapping runs send nothing twice.
    """
    dry_run = params.pop("dry_run")
    limit = params.pop("limit")
    rule_name = params.pop("rule_name")
    as_json = params.pop("as_json")
    wait_lock = params.pop("wait_lock")
    quiet = bool(params.get("quiet"))

    with errors_to_exit_codes(), _json_on_error(as_json, dry_run=dry_run):
        settings = build_settings(params)
        rules = select_rules(settings, rule_name)

        from poller import run as runner

        if dry_run:
            result = runner.dry_run(settings, rules, limit=limit)
            _report(result, as_json)
            return

        from poller.lock import RunLock, default_lock_path

        lock_path = settings.lock_file or default_lock_path(settings.database_url)
        # SIGTERM (cron or systemd stopping us) unwinds like Ctrl-C, so the
        # run releases its unsent claims instead of waiting out the lease.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        from poller import heartbeat, progress

        # The heartbeat starts only once the lock is ours, so a run that
        # finds another one running reports nothing to the monitor.
        with RunLock(lock_path, wait=wait_lock), heartbeat.reporting(settings.ping_url) as ping:
            console = sys.stderr if as_json else sys.stdout
            bar = progress.bar_for(settings, rules, limit=limit, quiet=quiet, stream=sys.stderr)
            try:
                with bar if bar is not None else contextlib.nullcontext():
                    result = runner.run(settings, rules, stdout=console, limit=limit, progress=bar)
            except runner.RunStopped as stopped:
                log.error("%s", stopped.result.summary())
                raise
            if ping is not None:
                ping.exit_code = 0 if result.ok else EXIT_FAILURE
                ping.summary = result.summary()

    _report(result, as_json)
    if not result.ok:
        raise SystemExit(EXIT_FAILURE)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _json_on_error(as_json: bool, *, dry_run: bool) -> Iterator[None]:
    """With --json, print the counts, the error and the exit code of a run that failed.

    The counts are those of a run that stopped part way (RunStopped), or
    zero for one that never started: invalid settings, a busy lock, an
    unreachable or unmigrated database.
    """
    try:
        yield
    except PollerError as exc:
        if as_json:
            from poller.run import RunResult

            result = getattr(exc, "result", None)
            if not isinstance(result, RunResult):
                result = RunResult(dry_run=dry_run)
            data = result.as_dict()
            data["error"] = str(exc)
            data["exit_code"] = exc.exit_code
            click.echo(json.dumps(data))
        raise


def _report(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    if result.dry_run and not as_json:
        for preview in result.previews:
            kind = "retry" if preview.retry else "new"
            click.echo(
                f"would notify user {preview.user_id} <{preview.email}> ({preview.rule}, {kind}): {preview.subject}"
            )
    level = logging.INFO if result.ok else logging.ERROR
    log.log(level, "%s", result.summary())


@cli.group()
def db() -> None:
    """Create or inspect poller's own table (sent_notifications)."""


@db.command()
@common_options
@settings_options(("database_url",))
def upgrade(**params: Any) -> None:
    """Create or migrate sent_notifications to the latest revision.

    Creates the SQLite database file if it does not exist. Never touches the
    users table.
    """
    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller import db as database
        from poller import migrate

        engine = database.create_engine(settings.database_url, must_exist=False)
        with database.database_errors(settings.database_url, "migrating"):
            before, after = migrate.upgrade(engine)
        engine.dispose()
    if before == after:
        log.info("Database is already at the latest revision %s", after)
    else:
        log.info("Upgraded the database from %s to %s", before or "empty", after)


@db.command()
@common_options
@settings_options(("database_url",))
def current(**params: Any) -> None:
    """Print the database's migration revision, and the latest one."""
    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller import db as database
        from poller import migrate

        engine = database.create_engine(settings.database_url)
        with database.database_errors(settings.database_url, "reading the revision"), engine.connect() as connection:
            revision = migrate.current_revision(connection)
        engine.dispose()
    head = migrate.head_revision()
    state = "up to date" if revision == head else "run `poller db upgrade`"
    click.echo(f"{revision or 'none'} (latest: {head}; {state})")


@cli.command("sample-db")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--users", "count", type=click.IntRange(min=1), default=12, show_default=True, help="How many sample users."
)
def sample_db(path: str, count: int) -> None:
    """Create a new SQLite file with a sample users table, for trying poller out.

    About half of the users have 100 points or more. Refuses to touch an
    existing file.
    """
    from poller.sample import create_sample_database

    with errors_to_exit_codes():
        eligible = create_sample_database(path, count)
    click.echo(f"Created {path} with {count} users, {eligible} of them at 100 points or more.")


def main() -> None:
    cli(prog_name="poller")


# Registered last: these modules import the helpers defined above.
from poller.cli_cron import cron  # noqa: E402
from poller.cli_doctor import doctor  # noqa: E402
from poller.cli_ops import COMMANDS as OPS_COMMANDS  # noqa: E402

cli.add_command(cron)
cli.add_command(doctor)
for _command in OPS_COMMANDS:
    cli.add_command(_command)
