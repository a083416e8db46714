"""`--help` of the commands built from the settings table."""

from __future__ import annotations

import re
from typing import Any

import pytest

from poller.settings import SETTINGS


@pytest.fixture
def run_help(invoke: Any) -> str:
    result = invoke("run", "--help")
    assert result.exit_code == 0
    return " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "option,metavar",
    [
        ("--threshold", "NUMBER"),
        ("--smtp-timeout", "SECONDS"),
        ("--lease", "SECONDS"),
        ("--max-attempts", "INTEGER"),
        ("--batch-size", "INTEGER"),
        ("--smtp-connections", "INTEGER"),
        ("--body-file", "PATH"),
        ("--lock-file", "PATH"),
        ("--database-url", "URL"),
        ("--ping-url", "URL"),
    ],
)
def test_option_shows_value_kind(run_help: str, option: str, metavar: str) -> None:
    assert f"{option} {metavar} " in run_help


def test_no_setting_option_shows_text_for_numbers(run_help: str) -> None:
    numeric = [setting.flag for setting in SETTINGS if isinstance(setting.default, (int, float))]

    for flag in numeric:
        assert f"{flag} TEXT" not in run_help


def test_template_defaults_shown_as_built_in(run_help: str) -> None:
    subject = re.search(r"POLLER_SUBJECT; default: ([^\]]*)\]", run_help)
    body = re.search(r"POLLER_BODY; default: ([^\]]*)\]", run_help)

    assert subject is not None
    assert subject.group(1) == "(built in)"
    assert body is not None
    assert body.group(1) == "(built in)"


def test_seconds_default_without_trailing_zero(run_help: str) -> None:
    assert "POLLER_SMTP_TIMEOUT; default: 30]" in run_help


def test_every_setting_option_has_value_name() -> None:
    for setting in SETTINGS:
        assert setting.value_name.isupper()
