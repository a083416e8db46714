"""A systemd .service and .timer pair, for hosts that schedule with timers instead of cron."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

from poller.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ON_CALENDAR = "*:0/5"

# Characters systemd's calendar syntax uses; anything else is surely a typo.
ON_CALENDAR_PATTERN = re.compile(r"[A-Za-z0-9*/,.:~ +-]+")


def check_on_calendar(spec: str) -> str:
    """Return the spec stripped, or raise ConfigError if it is not a calendar event.

    `systemd-analyze calendar` checks the syntax where it is installed. On a
    host without it only the character set is checked.
    """
    text = spec.strip()
    problem = ""
    if not text or not ON_CALENDAR_PATTERN.fullmatch(text):
        problem = "it contains characters that a calendar event never has"
    elif shutil.which("systemd-analyze"):
        try:
            result = subprocess.run(
                ["systemd-analyze", "calendar", text], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("Could not check --on-calendar with systemd-analyze: %s", exc)
        else:
            if result.returncode != 0:
                problem = " ".join(result.stderr.split()) or "systemd-analyze rejected it"
    if problem:
        raise ConfigError(
            f"--on-calendar {spec!r} is not a systemd calendar event ({problem}). Use a form such as '*:0/5' "
            "(every five minutes) or 'daily', and check it with: systemd-analyze calendar SPEC."
        )
    return text


def _quote(argument: str) -> str:
    # systemd splits ExecStart itself (no shell): double quotes group an
    # argument, backslash escapes, % starts a specifier and $ a variable.
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def render_units(
    name: str, arguments: list[str], on_calendar: str, run_as: str | None = None, log_file: Path | None = None
) -> dict[str, str]:
    """Return {file name: text} for NAME.service and NAME.timer."""
    exec_start = " ".join(_quote(argument) for argument in arguments)
    service = [
        "[Unit]",
        "Description=poller: email users who reached the points threshold",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={exec_start}",
        # 75 means another run holds the lock, which is not a failure.
        "SuccessExitStatus=75",
    ]
    if run_as:
        service.append(f"User={run_as}")
    if log_file is not None:
        target = str(log_file).replace("%", "%%")
        service += [f"StandardOutput=append:{target}", f"StandardError=append:{target}"]

    timer = [
        "[Unit]",
        f"Description=Run {name}.service on schedule",
        "",
        "[Timer]",
        f"OnCalendar={on_calendar}",
        # Catch up on a run missed while the host was off.
        "Persistent=true",
        "",
        "[Install]",
        "WantedBy=timers.target",
    ]
    return {f"{name}.service": "\n".join(service) + "\n", f"{name}.timer": "\n".join(timer) + "\n"}
