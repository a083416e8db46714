"""`poller cron install|show|remove|systemd`: the click layer over poller.cron.

Nothing here imports SQLAlchemy or Alembic, so `poller cron show` starts fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from poller import cron as crontab
from poller.cli import build_settings, common_options, configure_logging, errors_to_exit_codes, settings_options
from poller.errors import ConfigError

log = logging.getLogger("poller")

F = TypeVar("F", bound=Callable[..., Any])


def target_options(func: F) -> F:
    """--user, --file and --run-as: which crontab to change."""
    func = click.option(
        "--run-as",
        default=None,
        help="User the job runs as, for --file (the user field of /etc/cron.d lines). Default: the current user.",
    )(func)
    func = click.option(
        "--file",
        "cron_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Use this system cron file (/etc/cron.d format) instead of a user's crontab.",
    )(func)
    func = click.option(
        "--user", default=None, help="Use this user's crontab (crontab -u) instead of your own; needs root."
    )(func)
    return func


def make_target(user: str | None, cron_file: Path | None) -> crontab.Target:
    if user and cron_file:
        raise ConfigError("--user and --file cannot be combined. With --file, set the job's user with --run-as.")
    if cron_file is not None:
        cron_file = Path(cron_file).expanduser().absolute()
        if cron_file.parent == Path("/etc/cron.d") and not crontab.NAME_PATTERN.fullmatch(cron_file.name):
            # Debian's cron ignores files in /etc/cron.d whose names contain dots.
            raise ConfigError(
                f"--file {str(cron_file)!r}: cron ignores files in /etc/cron.d whose names contain a dot "
                "or other characters than letters, digits, '-' and '_'. Use for example /etc/cron.d/poller."
            )
    return crontab.Target(user=user, file=cron_file)


def _default_run_as() -> str:
    import getpass

    return getpass.getuser()


@click.group()
def cron() -> None:
    """Install, show or remove the crontab line that runs `poller run`."""


@cron.command()
@common_options
@settings_options()
@click.option(
    "--schedule",
    required=True,
    help="Five cron fields such as '*/5 * * * *', or @hourly, @daily, @weekly, @monthly, @yearly, @reboot.",
)
@click.option(
    "--name",
    default=crontab.DEFAULT_NAME,
    show_default=True,
    help="Name of this line; reinstalling with the same name replaces it.",
)
@target_options
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append the run's output to this file instead of letting cron mail it.",
)
@click.option("--dry-run", is_flag=True, help="Print the change as a diff and write nothing.")
def install(**params: Any) -> None:
    """Write or replace poller's line in a crontab.

    The line runs this install's poller by absolute path with every setting
    given here (options, POLLER_* variables, --config), so it works under
    cron's bare environment. By default it runs `poller run --quiet`, so cron
    mails only when something failed.
    """
    schedule_text = params.pop("schedule")
    name = params.pop("name")
    user = params.pop("user")
    cron_file = params.pop("cron_file")
    run_as = params.pop("run_as")
    log_file = params.pop("log_file")
    dry_run = params.pop("dry_run")

    from poller import run_command

    with errors_to_exit_codes():
        schedule = crontab.validate_schedule(schedule_text)
        crontab.check_name(name)
        target = make_target(user, cron_file)
        if run_as and not target.is_file:
            raise ConfigError("--run-as applies only to --file. For a user's crontab, use --user.")
        if target.is_file and not run_as:
            run_as = _default_run_as()
        settings = build_settings(params)

        executable = run_command.poller_executable()
        arguments = run_command.run_arguments(settings, executable, quiet=log_file is None)
        log_path = Path(log_file).expanduser().absolute() if log_file is not None else None
        command = run_command.shell_command(arguments, log_path)
        line = crontab.render_line(schedule, command, name, run_as)

        old = crontab.read_crontab(target)
        new = crontab.with_line(old, name, line, target.is_file)
        diff = crontab.unified_diff(old, new, target.label())
        click.echo(diff, nl=False)
        if old == new:
            click.echo(f"The {target.label()} already has this line; nothing to change.")
            return
        if dry_run:
            click.echo("Dry run: nothing was written.")
            return
        crontab.apply_change(target, old, new)

    runs = crontab.next_runs(schedule)
    when = ", ".join(f"{run:%Y-%m-%d %H:%M}" for run in runs) if runs else "at the next system startup"
    click.echo(f"Installed {name!r} in the {target.label()}: {crontab.describe_schedule(schedule)}; next runs {when}.")


@cron.command()
@click.option("--name", default=None, help="Show only the line of this name. Default: every poller line.")
@target_options
def show(name: str | None, user: str | None, cron_file: Path | None, run_as: str | None) -> None:
    """List poller's lines with the schedule in words and the next three run times."""
    configure_logging(0, False)
    with errors_to_exit_codes():
        if name is not None:
            crontab.check_name(name)
        target = make_target(user, cron_file)
        text = crontab.read_crontab(target)
        entries = [entry for _, entry in crontab.find_entries(text, name, target.is_file)]
        if not entries:
            which = f"named {name!r} " if name else ""
            click.echo(
                f"No poller line {which}in the {target.label()}. Add one with: poller cron install --schedule ..."
            )
            return
        for entry in entries:
            _show_entry(entry)


def _show_entry(entry: crontab.Entry) -> None:
    state = "" if entry.enabled else " (commented out, does not run)"
    click.echo(f"{entry.name}{state}")
    try:
        schedule = crontab.validate_schedule(entry.schedule)
    except ConfigError as exc:
        click.echo(f"  schedule: {entry.schedule} (invalid: {exc})")
    else:
        click.echo(f"  schedule: {schedule} ({crontab.describe_schedule(schedule)})")
        runs = crontab.next_runs(schedule)
        when = ", ".join(f"{run:%Y-%m-%d %H:%M}" for run in runs) if runs else "at the next system startup"
        click.echo(f"  next runs: {when}")
    if entry.user:
        click.echo(f"  runs as: {entry.user}")
    click.echo(f"  command: {entry.command}")


@cron.command()
@click.option("--name", default=crontab.DEFAULT_NAME, show_default=True, help="Remove the line of this name.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every poller line, whatever its name.")
@target_options
@click.option("--dry-run", is_flag=True, help="Print the change as a diff and write nothing.")
def remove(
    name: str, remove_all: bool, user: str | None, cron_file: Path | None, run_as: str | None, dry_run: bool
) -> None:
    """Remove poller's line (or every poller line, with --all) and nothing else."""
    configure_logging(0, False)
    with errors_to_exit_codes():
        crontab.check_name(name)
        target = make_target(user, cron_file)
        old = crontab.read_crontab(target)
        new = crontab.without_lines(old, None if remove_all else name, target.is_file)
        click.echo(crontab.unified_diff(old, new, target.label()), nl=False)
        if old == new:
            which = "" if remove_all else f" named {name!r}"
            click.echo(f"No poller line{which} in the {target.label()}; nothing to remove.")
            return
        if dry_run:
            click.echo("Dry run: nothing was written.")
            return
        crontab.apply_change(target, old, new)
    click.echo(f"Removed from the {target.label()}.")


@cron.command()
@common_options
@settings_options()
@click.option(
    "--on-calendar",
    default=None,
    help="systemd calendar event, such as '*:0/5' (every five minutes, the default) or 'daily'.",
)
@click.option("--name", default=crontab.DEFAULT_NAME, show_default=True, help="Unit name: NAME.service and NAME.timer.")
@click.option("--run-as", default=None, help="User= of the service. Default: root, as for any system service.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append the run's output to this file instead of the journal.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write both units into this directory (such as /etc/systemd/system) instead of printing them.",
)
def systemd(**params: Any) -> None:
    """Print or write a systemd .service and .timer pair that run `poller run`.

    For hosts that schedule with systemd timers instead of cron. Enable the
    timer with: systemctl daemon-reload && systemctl enable --now NAME.timer
    """
    from poller import run_command
    from poller import systemd as units

    on_calendar = params.pop("on_calendar") or units.DEFAULT_ON_CALENDAR
    name = params.pop("name")
    run_as = params.pop("run_as")
    log_file = params.pop("log_file")
    output_dir = params.pop("output_dir")

    with errors_to_exit_codes():
        on_calendar = units.check_on_calendar(on_calendar)
        crontab.check_name(name)
        settings = build_settings(params)
        # The journal keeps every run's summary, so the run is not quiet.
        arguments = run_command.run_arguments(settings, run_command.poller_executable(), quiet=False)
        log_path = Path(log_file).expanduser().absolute() if log_file is not None else None
        files = units.render_units(name, arguments, on_calendar, run_as, log_path)

    if output_dir is None:
        for file_name, text in files.items():
            click.echo(f"# {file_name}\n{text}")
        return
    for file_name, text in files.items():
        path = Path(output_dir) / file_name
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"Cannot write {path}: {exc.strerror}.") from None
        click.echo(f"Wrote {path}")
    click.echo(f"Enable it with: systemctl daemon-reload && systemctl enable --now {name}.timer")
