"""Operator commands: pending, history, reset, retry, send-test and config show.

A thin click layer like poller/cli.py: each command builds the settings,
calls plain functions (poller/ops.py, poller/run.py's dry run, the mail
backends) and prints a table, JSON or CSV.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from poller.cli import build_settings, common_options, errors_to_exit_codes, settings_options
from poller.errors import STATUSES, MailError
from poller.settings import SETTINGS, Settings, select_rules
from poller.table import echo_table

if TYPE_CHECKING:
    import sqlalchemy as sa

DATABASE_SETTINGS = ("database_url",)
# Settings that `poller pending` reads: the users table and the templates (to render
# subjects), but no mail settings.
PENDING_SETTINGS = (
    "database_url",
    "mail_from",
    "threshold",
    "users_table",
    "id_column",
    "email_column",
    "points_column",
    "name_column",
    "subject",
    "body",
    "body_file",
    "html_body_file",
    "lease",
    "batch_size",
)
MAIL_SETTINGS = (
    "mail_url",
    "mail_from",
    "smtp_password_file",
    "smtp_timeout",
    "smtp_ca_file",
    "threshold",
    "subject",
    "body",
    "body_file",
    "html_body_file",
)
SINCE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"]


def utc_text(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


@contextlib.contextmanager
def migrated_engine(settings: Settings, action: str) -> Iterator[sa.Engine]:
    """Open the database, check that it is migrated, and turn connection errors into DatabaseError."""
    from poller import db

    engine = db.create_engine(settings.database_url)
    try:
        with db.database_errors(settings.database_url, action):
            with engine.connect() as connection:
                db.check_migrated(connection)
            yield engine
    finally:
        engine.dispose()


# pending -------------------------------------------------------------------


@click.command()
@common_options
@settings_options(PENDING_SETTINGS)
@click.option("--rule", "rule_name", default=None, help="List only the rule of this name.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="List at most this many notifications.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def pending(**params: Any) -> None:
    """List who `poller run` would notify now, without writing or sending anything.

    Uses the run's own query: retries that are due first, then users who
    reached a rule's threshold and have no notification for it yet.
    """
    rule_name = params.pop("rule_name")
    limit = params.pop("limit")
    as_json = params.pop("as_json")

    with errors_to_exit_codes():
        settings = build_settings(params)
        rules = select_rules(settings, rule_name)
        from poller.run import dry_run

        result = dry_run(settings, rules, limit=limit)

    if as_json:
        items = [
            {
                "rule": preview.rule,
                "user_id": preview.user_id,
                "email": preview.email,
                "name": preview.name,
                "kind": "retry" if preview.retry else "new",
                "subject": preview.subject,
            }
            for preview in result.previews
        ]
        click.echo(json.dumps(items, indent=2))
        return
    rows = [
        (
            preview.rule,
            preview.user_id,
            preview.email,
            preview.name,
            "retry" if preview.retry else "new",
            preview.subject,
        )
        for preview in result.previews
    ]
    echo_table(("RULE", "USER", "EMAIL", "NAME", "KIND", "SUBJECT"), rows)


# history -------------------------------------------------------------------

HISTORY_FIELDS = (
    "id",
    "rule",
    "user_id",
    "email",
    "status",
    "attempts",
    "last_error",
    "message_id",
    "created_at",
    "claimed_at",
    "sent_at",
    "next_attempt_at",
    "claimed",
)


@click.command()
@common_options
@settings_options(DATABASE_SETTINGS)
@click.option("--user", "user_id", default=None, help="Only this user id.")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only notifications in this state.")
@click.option(
    "--since",
    type=click.DateTime(SINCE_FORMATS),
    default=None,
    help="Only notifications created at or after this UTC date or time (2024-05-01 or 2024-05-01T12:00).",
)
@click.option("--rule", default=None, help="Only this rule, for example points-100.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Show at most this many notifications; 0 shows all.",
)
@click.option("--json", "output", flag_value="json", help="Print a JSON array instead of a table.")
@click.option("--csv", "output", flag_value="csv", help="Print CSV with a header row, for spreadsheets.")
def history(**params: Any) -> None:
    """List recorded notifications, newest first.

    Times are UTC. The table shows when each notification was sent (or, if
    not sent, created), its state, attempts and last error; --json and
    --csv add the Message-ID and every timestamp.
    """
    filters = {name: params.pop(name) for name in ("user_id", "status", "since", "rule")}
    limit = params.pop("limit") or None
    output = params.pop("output")

    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller import ops

        with migrated_engine(settings, "reading notifications") as engine:
            rows = ops.history(engine, limit=limit, **filters)

    if output == "json":
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    elif output == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    else:
        table = [
            (
                utc_text(row.sent_at or row.created_at),
                row.rule,
                row.user_id,
                row.email,
                row.status,
                row.attempts,
                row.last_error,
            )
            for row in rows
        ]
        echo_table(("TIME (UTC)", "RULE", "USER", "EMAIL", "STATUS", "ATTEMPTS", "LAST ERROR"), table)


# reset and retry -----------------------------------------------------------


@click.command()
@common_options
@settings_options(("database_url", "lease"))
@click.option("--user", "user_id", required=True, help="The user id whose notification to forget.")
@click.option("--rule", default=None, help="Forget only this rule's notification. Default: every rule.")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
def reset(**params: Any) -> None:
    """Forget a user's notification, so that the next run notifies them again.

    Deletes the sent_notifications row. Rejects a notification that a run
    is sending now (pending and claimed within --lease).
    """
    user_id = params.pop("user_id")
    rule = params.pop("rule")
    assume_yes = params.pop("assume_yes")

    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller import ops, store

        with migrated_engine(settings, "resetting a notification") as engine:
            rows = ops.find_for_reset(engine, user_id, rule)
            ops.check_not_busy(rows, store.utcnow(), settings.lease)

            echo_table(
                ("RULE", "USER", "EMAIL", "STATUS", "ATTEMPTS", "TIME (UTC)"),
                [
                    (
                        row.rule,
                        row.user_id,
                        row.email,
                        row.status,
                        row.attempts,
                        utc_text(row.sent_at or row.created_at),
                    )
                    for row in rows
                ],
            )
            if not assume_yes:
                click.confirm(
                    f"Forget these {len(rows)} notification(s), so that user {user_id} can be notified again?",
                    abort=True,
                )
            deleted = ops.reset(engine, rows, store.utcnow(), settings.lease)

    click.echo(f"Forgot {deleted} notification(s) of user {user_id}; the next run notifies them if they are due.")
    if deleted < len(rows):
        raise click.ClickException(
            f"{len(rows) - deleted} notification(s) were claimed by a run meanwhile and were kept. "
            "Run the command again when that run has finished."
        )


@click.command()
@common_options
@settings_options(DATABASE_SETTINGS)
@click.option("--failed", is_flag=True, help="Retry notifications in the failed state (required).")
@click.option("--user", "user_id", default=None, help="Only this user id.")
@click.option("--rule", default=None, help="Only this rule.")
def retry(**params: Any) -> None:
    """Make failed notifications eligible again, with their attempt count reset to 0.

    The next `poller run` sends them, with their original Message-ID.
    """
    failed = params.pop("failed")
    user_id = params.pop("user_id")
    rule = params.pop("rule")
    if not failed:
        raise click.UsageError("Pass --failed to retry failed notifications; it is the only kind that can be retried.")

    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller import ops

        with migrated_engine(settings, "retrying notifications") as engine:
            count = ops.retry_failed(engine, user_id=user_id, rule=rule)
    click.echo(f"Made {count} failed notification(s) eligible again; the next run sends them.")


# send-test -----------------------------------------------------------------

SAMPLE_NAME = "Sample User"


@click.command("send-test")
@common_options
@settings_options(MAIL_SETTINGS)
@click.option("--to", "address", required=True, help="Address that receives the test message.")
@click.option("--rule", "rule_name", default=None, help="Use this rule's templates. Default: the first rule.")
def send_test(**params: Any) -> None:
    """Send one message rendered for a sample user through the configured mail backend.

    Reads no database and records nothing, so it proves the mail settings
    (host, TLS, password, sender) on their own.
    """
    address = params.pop("address")
    rule_name = params.pop("rule_name")

    with errors_to_exit_codes():
        settings = build_settings(params)
        from poller.errors import ConfigError
        from poller.mail import Status, backend_factory, envelope_sender
        from poller.message import InvalidRow, Recipient, build_message, new_message_id, normalize_address

        rule = select_rules(settings, rule_name)[0]
        try:
            recipient_address = normalize_address(address)
        except InvalidRow as exc:
            raise ConfigError(f"--to {address!r} is not a usable address: {exc}.") from None
        sender = settings.sender
        recipient = Recipient("sample", recipient_address, SAMPLE_NAME, rule.threshold)
        message = build_message(recipient, rule, sender=sender, message_id=new_message_id(sender))

        backend = backend_factory(settings, sys.stdout)()
        try:
            outcome = backend.send(message, envelope_sender(sender), recipient_address)
        finally:
            backend.close()
        if outcome.status is not Status.ACCEPTED:
            raise MailError(
                f"The mail backend did not accept the test message for {recipient_address}: {outcome.reply}"
            )

    where = settings.display("mail_url")
    click.echo(f"Sent a test message ({rule.name}) to {recipient_address} through {where}; it was accepted.")


# config show ---------------------------------------------------------------


def effective_value(settings: Settings, name: str) -> str:
    """Return the value as output may show it: secrets masked, the default sender filled in."""
    if name == "mail_from":
        return settings.sender
    return settings.display(name)


def describe_source(settings: Settings, name: str) -> str:
    """Return where a value came from: option --x, environment POLLER_X, file PATH or default."""
    setting = next(setting for setting in SETTINGS if setting.name == name)
    source = settings.sources[name]
    if source == "option":
        return f"option {setting.flag}"
    if source == "environment":
        return f"environment {setting.env}"
    if source == "file":
        return f"file {settings.config_path}"
    return "default"


@click.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command()
@common_options
@settings_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def show(**params: Any) -> None:
    """Print every effective setting and where it came from, with secrets masked.

    Sources, highest first: option, environment (POLLER_*), config file,
    default. The rules follow the settings.
    """
    as_json = params.pop("as_json")

    with errors_to_exit_codes():
        settings = build_settings(params)

    rules = [
        {
            "name": rule.name,
            "threshold": str(rule.threshold),
            "subject": rule.subject,
            "html": rule.html_body is not None,
        }
        for rule in settings.rules
    ]
    if as_json:
        data = {
            "settings": {
                setting.name: {
                    "value": effective_value(settings, setting.name),
                    "source": describe_source(settings, setting.name),
                }
                for setting in SETTINGS
            },
            "rules": rules,
        }
        click.echo(json.dumps(data, indent=2))
        return

    table = [
        (setting.name, effective_value(settings, setting.name), describe_source(settings, setting.name))
        for setting in SETTINGS
    ]
    echo_table(("SETTING", "VALUE", "SOURCE"), table)
    click.echo()
    echo_table(
        ("RULE", "THRESHOLD", "HTML", "SUBJECT"),
        [(rule["name"], rule["threshold"], "yes" if rule["html"] else "no", rule["subject"]) for rule in rules],
    )


COMMANDS = (pending, history, reset, retry, send_test, config)
