"""`poller cron remove` against the real crontab program.

These tests use the crontab of the user `nobody` (through --user, so they
need root) rather than the current user's, which other tests and the
cron daemon test fill at the same time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_cron import FOREIGN, unique_name

USER = "nobody"


def crontab(*arguments: str, text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["crontab", "-u", USER, *arguments], input=text, capture_output=True, text=True, check=False)


@pytest.fixture
def user_crontab() -> Iterator[None]:
    """Save the crontab of `nobody` and restore it afterwards."""
    if shutil.which("crontab") is None or os.geteuid() != 0:
        pytest.skip("needs the crontab program and root, for crontab -u")
    listed = crontab("-l")
    saved = listed.stdout if listed.returncode == 0 else None
    crontab("-r")
    try:
        yield
    finally:
        if saved is None:
            crontab("-r")
        else:
            crontab("-", text=saved)


@pytest.fixture
def settings_env(tmp_path: Path) -> dict[str, str]:
    return {"POLLER_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}", "POLLER_MAIL_URL": "smtp://127.0.0.1:2525"}


@pytest.mark.usefixtures("user_crontab")
def test_remove_last_line_deletes_crontab(invoke: Any, settings_env: dict[str, str]) -> None:
    name = unique_name()
    installed = invoke("cron", "install", "--user", USER, "--schedule", "@daily", "--name", name, env=settings_env)

    removed = invoke("cron", "remove", "--user", USER, "--name", name)

    assert installed.exit_code == 0, installed.output
    assert removed.exit_code == 0, removed.output
    listed = crontab("-l")
    assert listed.returncode != 0
    assert "no crontab for" in listed.stderr


@pytest.mark.usefixtures("user_crontab")
def test_remove_keeps_crontab_with_other_lines(invoke: Any, settings_env: dict[str, str]) -> None:
    crontab("-", text=FOREIGN)
    name = unique_name()
    invoke("cron", "install", "--user", USER, "--schedule", "@daily", "--name", name, env=settings_env)

    removed = invoke("cron", "remove", "--user", USER, "--name", name)

    assert removed.exit_code == 0, removed.output
    assert crontab("-l").stdout == FOREIGN
