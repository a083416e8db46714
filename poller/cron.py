"""Read, change and write the crontab line that runs poller.

python-crontab parses and validates schedules, finds poller's lines by their
marker comment, describes schedules and computes the next run times. It does
not write the crontab, because its render() rewrites every line it parses:
tabs become spaces, variables move to the top, `0 0 * * *` becomes `@daily`.
Instead poller replaces its own line in the text it read and hands the result
to the `crontab` program, or replaces the cron file.

This module imports neither SQLAlchemy nor Alembic, so `poller cron show`
starts quickly.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from poller.errors import ConfigError, CronError

log = logging.getLogger(__name__)

# The comment that marks a line as poller's: "# poller-job:NAME".
MARKER_PREFIX = "poller-job:"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULT_NAME = "poller"

# The special schedules poller accepts, with the five fields each stands for.
SPECIAL_SCHEDULES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@reboot": None,
}
FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")

# How long the crontab program may take before poller gives up on it, in seconds.
CRONTAB_TIMEOUT = 30


def marker(name: str) -> str:
    """Return the comment text that identifies the line installed under `name`."""
    return MARKER_PREFIX + name


def check_name(name: str) -> str:
    """Return `name` if it can be part of a marker, else raise ConfigError."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"--name {name!r} is invalid. Use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit."
        )
    return name


def validate_schedule(expression: str) -> str:
    """Return the schedule with single spaces, or raise ConfigError naming the bad field."""
    fields = expression.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0] in SPECIAL_SCHEDULES:
            return fields[0]
        allowed = ", ".join(SPECIAL_SCHEDULES)
        raise ConfigError(f"--schedule {expression!r}: {fields[0]!r} is not a special schedule. Use one of {allowed}.")
    if len(fields) != 5:
        raise ConfigError(
            f"--schedule {expression!r} has {len(fields)} fields; cron needs five "
            "(minute hour day-of-month month day-of-week), for example '*/5 * * * *', or one of "
            + ", ".join(SPECIAL_SCHEDULES)
            + "."
        )

    from crontab import S_INFO, CronSlice  # python-crontab imports asyncio: load it only when needed

    for info, field_name, value in zip(S_INFO, FIELD_NAMES, fields, strict=True):
        try:
            CronSlice(info, value)
        except (ValueError, KeyError) as exc:
            reason = exc.args[0] if exc.args else exc
            raise ConfigError(
                f"--schedule {expression!r}: the {field_name} field {value!r} is invalid ({reason}). "
                f"It takes {info['min']}-{info['max']}, '*', lists, ranges and steps such as */5."
            ) from None
    return " ".join(fields)


def describe_schedule(schedule: str) -> str:
    """Return the schedule in English words, such as 'Every 5 minutes'."""
    if schedule == "@reboot":
        return "At system startup"
    from crontab import CronTab

    item = CronTab(tab="").new(command="true")
    item.setall(SPECIAL_SCHEDULES.get(schedule) or schedule)
    return str(item.description(use_24hour_time_format=True))


def next_runs(schedule: str, count: int = 3, now: datetime.datetime | None = None) -> list[datetime.datetime]:
    """Return the next `count` local times the schedule fires after `now`; none for @reboot."""
    if schedule == "@reboot":
        return []
    from crontab import CronTab

    item = CronTab(tab="").new(command="true")
    item.setall(SPECIAL_SCHEDULES.get(schedule) or schedule)
    iterator = item.schedule(date_from=now or datetime.datetime.now())
    return [iterator.get_next(datetime.datetime) for _ in range(count)]


@dataclasses.dataclass(frozen=True)
class Target:
    """The crontab poller changes: a user's (through `crontab`) or a system cron file."""

    user: str | None = None  # None: the current user's crontab
    file: Path | None = None  # a file in the /etc/cron.d format, with a user field

    @property
    def is_file(self) -> bool:
        return self.file is not None

    def label(self) -> str:
        if self.file is not None:
            return str(self.file)
        return f"crontab of {self.user}" if self.user else "crontab of the current user"


def crontab_program() -> str:
    """Return the path of the `crontab` program on PATH, or raise CronError."""
    program = shutil.which("crontab")
    if program is None:
        raise CronError("The crontab program was not found on PATH. Install cron (Debian: apt-get install cron).")
    return program


def _run_crontab(arguments: list[str], target: Target, text: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [crontab_program()]
    if target.user:
        command += ["-u", target.user]
    command += arguments
    try:
        return subprocess.run(command, input=text, capture_output=True, text=True, timeout=CRONTAB_TIMEOUT, check=False)
    except OSError as exc:
        raise CronError(f"Cannot run {command[0]}: {exc.strerror}.") from None
    except subprocess.TimeoutExpired:
        raise CronError(f"{command[0]} did not finish within {CRONTAB_TIMEOUT} s.") from None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no error message"


def read_crontab(target: Target) -> str:
    """Return the crontab's text; an empty string when it does not exist yet."""
    if target.file is not None:
        try:
            return target.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as exc:
            raise CronError(f"Cannot read cron file {str(target.file)!r}: {exc}.") from None

    result = _run_crontab(["-l"], target)
    if result.returncode == 0:
        return result.stdout
    # Debian's crontab -l exits 1 with "no crontab for USER" when there is none.
    if "no crontab for" in result.stderr:
        return ""
    raise CronError(f"Cannot read the {target.label()}: crontab -l failed: {_one_line(result.stderr)}")


def write_crontab(target: Target, text: str) -> None:
    """Replace the crontab with `text`."""
    if target.file is None:
        result = _run_crontab(["-"], target, text)
        if result.returncode != 0:
            raise CronError(f"Cannot write the {target.label()}: crontab failed: {_one_line(result.stderr)}")
        return

    _replace_file(target.file, text)


def _replace_file(path: Path, text: str) -> None:
    # Replace atomically, so cron never reads a half-written file. cron skips
    # files in /etc/cron.d that group or others can write, hence 0644.
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    mode &= ~0o022
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise CronError(f"Cannot write cron file {str(path)!r}: {exc.strerror or exc}.") from None


def remove_crontab(target: Target) -> None:
    """Delete a user's crontab with `crontab -r`; a crontab that does not exist is no error."""
    result = _run_crontab(["-r"], target)
    if result.returncode != 0 and "no crontab for" not in result.stderr:
        raise CronError(f"Cannot remove the {target.label()}: crontab -r failed: {_one_line(result.stderr)}")


def remove_file(path: Path) -> None:
    """Delete a cron file that no longer contains any line."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CronError(f"Cannot remove cron file {str(path)!r}: {exc.strerror}.") from None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of poller's lines in a crontab."""

    name: str
    schedule: str
    command: str  # as cron hands it to /bin/sh, with \\% turned back into %
    user: str | None  # the user field of a system cron file
    enabled: bool
    line: str


def _parse_line(line: str, system: bool) -> list[Entry]:
    """Return poller's entry on this one line, if it carries a poller marker."""
    from crontab import CronTab

    tab = CronTab(tab=line.rstrip("\r\n"), user=False if system else None)
    entries = []
    for item in tab.find_comment(re.compile("^" + re.escape(MARKER_PREFIX))):
        name = item.comment[len(MARKER_PREFIX) :]
        if not NAME_PATTERN.fullmatch(name):
            continue
        fields = line.lstrip().lstrip("#").split()
        schedule = fields[0] if fields[0].startswith("@") else " ".join(fields[:5])
        entries.append(Entry(name, schedule, item.command, item.user, item.is_enabled(), line.rstrip("\r\n")))
    return entries


def find_entries(text: str, name: str | None, system: bool) -> list[tuple[int, Entry]]:
    """Return (line index, entry) for poller's lines; every name when `name` is None.

    Lines are matched one at a time, so that a marker is only ever read from
    its own line, and commented-out poller lines count as poller's too.
    """
    found = []
    for index, line in enumerate(text.splitlines(keepends=True)):
        if MARKER_PREFIX not in line:
            continue
        for entry in _parse_line(line, system):
            if name is None or entry.name == name:
                found.append((index, entry))
    return found


def render_line(schedule: str, command: str, name: str, run_as: str | None = None) -> str:
    """Render one cron line; every % is escaped, because cron turns a bare % into a newline."""
    user_field = f"{run_as} " if run_as else ""
    escaped = command.replace("%", "\\%")
    line = f"{schedule} {user_field}{escaped} # {marker(name)}"

    # Parse the line back, so that a path cron tools would misread (a ' #'
    # inside quotes starts python-crontab's comment) is caught before writing.
    entries = _parse_line(line, system=run_as is not None)
    if len(entries) != 1 or entries[0].command != command or entries[0].name != name:
        raise ConfigError(
            "The cron line would not read back as written, probably because a path contains ' #' "
            f"or a line break: {line!r}. Use paths without them."
        )
    return line + "\n"


def with_line(text: str, name: str, line: str, system: bool) -> str:
    """Return `text` with the line named `name` replaced by `line` (appended if absent).

    Every other line is kept byte for byte. A second marked line with the
    same name (left by an older tool or a manual copy) is dropped.
    """
    lines = text.splitlines(keepends=True)
    indexes = [index for index, _ in find_entries(text, name, system)]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if indexes:
        lines[indexes[0]] = line
        for index in reversed(indexes[1:]):
            del lines[index]
    else:
        lines.append(line)
    return "".join(lines)


def without_lines(text: str, name: str | None, system: bool) -> str:
    """Return `text` without poller's lines named `name` (every name when None)."""
    lines = text.splitlines(keepends=True)
    for index, _ in reversed(find_entries(text, name, system)):
        del lines[index]
    return "".join(lines)


def unified_diff(old: str, new: str, label: str) -> str:
    """Return the change as a unified diff, empty when nothing changes."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{label} (current)",
            tofile=f"{label} (new)",
        )
    )


def apply_change(target: Target, old: str, new: str) -> None:
    """Write `new` unless the crontab changed since `old` was read.

    The check narrows the race with a concurrent `crontab -e` to the moment
    between this read and the write; cron offers no lock to close it.
    """
    current = read_crontab(target)
    if current != old:
        raise CronError(
            f"The {target.label()} changed while poller was preparing its change (someone ran crontab -e?). "
            "Nothing was written; run the command again."
        )
    # An empty crontab is removed, so that removing poller's last line
    # leaves no crontab where there was none before.
    if not new.strip():
        if target.file is not None:
            remove_file(target.file)
        else:
            remove_crontab(target)
        return
    write_crontab(target, new)
