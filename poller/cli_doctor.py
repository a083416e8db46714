"""`poller doctor`: the click layer over poller.doctor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from poller.cli import build_settings, common_options, settings_options
from poller.cli_cron import make_target, target_options
from poller.errors import EXIT_FAILURE, PollerError


@click.command()
@common_options
@settings_options()
@click.option("--name", default="poller", show_default=True, help="Name of the cron line to check.")
@target_options
def doctor(**params: Any) -> None:
    """Check the configuration, database, users table, mail server and cron line.

    Prints one line per check and exits 1 when any check fails. Nothing is
    sent: the mail check connects and greets the server (EHLO), then quits.
    """
    name = params.pop("name")
    user = params.pop("user")
    cron_file: Path | None = params.pop("cron_file")
    params.pop("run_as")

    from poller import doctor as checks

    lines = []
    try:
        settings = build_settings(params)
    except PollerError as exc:
        lines.append(checks.Check(checks.Status.FAIL, "configuration", str(exc)))
    else:
        source = f"config file {settings.config_path}" if settings.config_path else "options and environment"
        lines.append(checks.Check(checks.Status.OK, "configuration", f"valid ({source})"))
        config_file = checks.check_config_file(settings)
        if config_file is not None:
            lines.append(config_file)
        lines += list(checks.check_database(settings))
        lines.append(checks.check_mail(settings))

    try:
        target = make_target(user, cron_file)
    except PollerError as exc:
        lines.append(checks.Check(checks.Status.FAIL, "cron line", str(exc)))
    else:
        lines.append(checks.check_cron(target, name))

    for check in lines:
        click.echo(check.line())
    if any(check.status is checks.Status.FAIL for check in lines):
        raise SystemExit(EXIT_FAILURE)
