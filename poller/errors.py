"""The exceptions poller raises; the CLI turns each into an exit code."""

# Exit codes are part of the interface that cron wrappers and monitors rely on.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL from sysexits.h: another run holds the lock

# The states of a sent_notifications row. Kept here, not in poller.schema,
# so that commands can name them without importing SQLAlchemy.
STATUSES = ("pending", "sent", "failed")


class PollerError(Exception):
    """Base class: a failure whose message is written for the operator."""

    exit_code = EXIT_FAILURE


class ConfigError(PollerError):
    """A setting is missing or invalid; the message names it and the fix."""

    exit_code = EXIT_USAGE


class DatabaseError(PollerError):
    """The database is unreachable or not migrated."""


class MailError(PollerError):
    """The mail backend cannot deliver at all (as opposed to one recipient)."""


class MailStalled(MailError):
    """The server stopped confirming messages; `reply` describes the last one.

    The run records that message as a transient failure, like the ones
    before it, and then stops.
    """

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


class MailConfigError(MailError):
    """The mail server rejected our setup: TLS mode, certificate, credentials.

    These stop the run without marking any user failed, because the fault is
    in the configuration, not in the recipients.
    """


class LockBusy(PollerError):
    """Another run holds the lock file."""

    exit_code = EXIT_TEMPFAIL


class CronError(PollerError):
    """The crontab could not be read or written."""
