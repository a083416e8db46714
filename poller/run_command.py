"""Build the `poller run` command that cron or a systemd timer executes.

Cron starts it with /bin/sh, PATH=/usr/bin:/bin, the user's home as working
directory, no virtual environment, the C locale and none of the POLLER_*
variables of the shell that installed it. So the command names this
install's executable by absolute path, carries every setting that came from
the command line or the environment, makes every path absolute, and refers
to the config file instead of copying secrets.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from poller.errors import ConfigError
from poller.lock import canonical_database
from poller.settings import SETTINGS, SETTINGS_BY_NAME, Setting, Settings, read_config_file

log = logging.getLogger(__name__)


def poller_executable() -> Path:
    """Find this install's `poller` script: the one running, or the one beside this Python.

    The path is made absolute but symlinks are kept, because a virtual
    environment's scripts reach its Python through them.
    """
    candidates = []
    if Path(sys.argv[0]).name == "poller":
        candidates.append(Path(sys.argv[0]))
    candidates.append(Path(sys.executable).parent / "poller")
    on_path = shutil.which("poller")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return Path(os.path.abspath(candidate))
    raise ConfigError(
        "Cannot find the poller executable of this install. Install poller with pip "
        "(for example into /opt/poller/venv) and run this command with that install's poller."
    )


def readable_by_others(path: Path) -> bool:
    """Return True if users outside the file's owner and group may read it."""
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _has_password(database_url: str) -> bool:
    # Parsed by hand, because importing SQLAlchemy for make_url() would
    # slow down every cron command.
    authority = database_url.partition("://")[2].partition("/")[0]
    userinfo, at, _host = authority.rpartition("@")
    return bool(at) and ":" in userinfo


def _is_relative_path(raw: Any) -> bool:
    return isinstance(raw, str) and raw.strip() != "" and not Path(raw.strip()).is_absolute()


def _depends_on_cwd(setting: Setting, settings: Settings, raw_file_values: dict[str, Any]) -> bool:
    """Return True if a default or config file value is a relative path."""
    raw = raw_file_values.get(setting.name) if settings.sources[setting.name] == "file" else setting.default
    if setting.name == "database_url":
        return canonical_database(str(raw)) != str(raw)
    if setting.name == "mail_url":
        text = str(raw)
        return text.lower().startswith("mbox:") and _is_relative_path(text[len("mbox:") :].removeprefix("//"))
    return isinstance(settings.values[setting.name], Path) and _is_relative_path(raw)


def _render(setting: Setting, settings: Settings) -> str:
    """Render a setting's effective value for the command line, with absolute paths."""
    value = settings.values[setting.name]
    if setting.name == "database_url":
        return canonical_database(str(value))
    if setting.name == "mail_url" and settings.mail.scheme == "mbox":
        return "mbox:" + settings.mail.path
    return str(value)


def exposed_config_password(settings: Settings) -> str | None:
    """Return a warning if the config file contains a password and other users may read it, else None."""
    path = settings.config_path
    url_in_file = settings.sources["database_url"] == "file" and _has_password(settings.database_url)
    in_config = url_in_file or settings.sources.get("smtp_password") in ("file",)
    if not in_config or path is None or not readable_by_others(path):
        return None
    return f"Config file {path} contains a password and is readable by other users; run: chmod o-r {shlex.quote(str(path))}"


def _check_secrets(settings: Settings) -> None:
    """Raise ConfigError for a secret that only the installing shell has, and warn about readable files."""
    origin = settings.sources["smtp_password"]
    if origin in ("option", "environment") and settings.smtp_password_file is None:
        raise ConfigError(
            "The SMTP password comes from POLLER_SMTP_PASSWORD, which cron will not have, and poller does not "
            "write passwords into a crontab. Save it in a file only the cron user can read (chmod 600) and pass "
            "--smtp-password-file PATH, or set smtp_password in the config file."
        )
    if origin in ("option", "environment"):
        log.warning("POLLER_SMTP_PASSWORD is not copied into the cron line; scheduled runs read --smtp-password-file")

    url_source = settings.sources["database_url"]
    if url_source in ("option", "environment") and _has_password(settings.database_url):
        url_setting = SETTINGS_BY_NAME["database_url"]
        given_as = url_setting.flag if url_source == "option" else f"The variable {url_setting.env}"
        raise ConfigError(
            f"{given_as} contains a password, and poller does not write passwords into a crontab. "
            "Put database_url in a config file only the cron user can read (chmod 600) and pass --config, "
            "or use a URL without a password (for PostgreSQL, a ~/.pgpass file)."
        )

    warning = exposed_config_password(settings)
    if warning is not None:
        log.warning("%s", warning)
    password_file = settings.smtp_password_file
    if password_file is not None and readable_by_others(Path(password_file)):
        log.warning(
            "SMTP password file %s is readable by other users; run: chmod o-r %s",
            password_file,
            shlex.quote(str(password_file)),
        )


def run_arguments(settings: Settings, executable: Path, *, quiet: bool) -> list[str]:
    """Return the argument list of a `poller run` that reproduces these settings anywhere.

    Raises ConfigError for a setting that cannot go into a crontab: a
    password, or a value with a line break.
    """
    _check_secrets(settings)

    arguments = [str(executable), "run"]
    if quiet:
        arguments.append("--quiet")
    if settings.config_path is not None:
        arguments += ["--config", str(settings.config_path)]

    raw_file_values = read_config_file(settings.config_path) if settings.config_path else {}
    for setting in SETTINGS:
        if setting.secret or setting.flag is None or settings.values[setting.name] is None:
            continue
        rendered = _render(setting, settings)
        if settings.sources[setting.name] in ("default", "file"):
            if not _depends_on_cwd(setting, settings, raw_file_values):
                continue
            # The installing shell resolved this relative path against its
            # own directory, but cron starts in the home directory.
            log.info("Writing %s into the cron line as the absolute %s", setting.flag, rendered)
        if "\n" in rendered or "\r" in rendered:
            raise ConfigError(
                f"{setting.flag} contains a line break, which a crontab line cannot carry. "
                f"Put {setting.name} in the config file (or use --body-file) and pass --config."
            )
        arguments += [setting.flag, rendered]
    return arguments


def shell_command(arguments: list[str], log_file: Path | None = None) -> str:
    """Join the arguments for /bin/sh, appending stdout and stderr to `log_file` if given."""
    command = shlex.join(arguments)
    if log_file is not None:
        command += f" >>{shlex.quote(str(log_file))} 2>&1"
    return command
