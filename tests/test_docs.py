"""docs/configuration.md against the CLI's own parameters, so the two cannot drift."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import click
import pytest

from poller.cli import cli
from poller.settings import SETTINGS, SETTINGS_BY_NAME, Setting

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMON = {"config_path", "verbose", "quiet", "help"}


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def options(command: click.Command) -> list[click.Option]:
    return [param for param in command.params if isinstance(param, click.Option)]


def settings_rows() -> dict[str, list[str]]:
    """Cells of each row of the settings table, keyed by the key without backticks."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def section(heading: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^#|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/configuration.md has no section '### {heading}'"
    return match.group(1)


def documented_default(setting: Setting) -> str:
    default = setting.default
    if default is None:
        return "(none)"
    if isinstance(default, str) and "\n" in default:
        return "(built in)"
    if isinstance(default, (float, Decimal)):
        return f"`{default:g}`"
    return f"`{default}`"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.name)
def test_setting_row_matches(setting: Setting) -> None:
    row = settings_rows().get(setting.name)

    assert row is not None, f"{setting.name} is missing from the settings table"
    assert row[1] == (f"`{setting.flag}`" if setting.flag else "(none)")
    assert row[2] == f"`{setting.env}`"
    assert row[3] == documented_default(setting)


def test_settings_table_has_no_extra_rows() -> None:
    assert set(settings_rows()) == set(SETTINGS_BY_NAME)


@pytest.mark.parametrize("path,command", list(commands(cli)), ids=lambda value: str(value))
def test_command_options_documented(path: str, command: click.Command) -> None:
    text = section(f"poller {path}")

    for option in options(command):
        if option.name in SETTINGS_BY_NAME or option.name in COMMON:
            continue
        long_flag = max(option.opts, key=len)
        assert f"`{long_flag}`" in text, f"poller {path} {long_flag} is not documented"


def test_documented_flags_exist() -> None:
    flags = {flag for _path, command in commands(cli) for option in options(command) for flag in option.opts}
    flags |= {"--help"}

    mentioned = set(re.findall(r"`(--[a-z][a-z-]*)", DOC.read_text(encoding="utf-8")))

    assert mentioned - flags == set()


def test_setting_options_match_settings() -> None:
    for _path, command in commands(cli):
        for option in options(command):
            if option.name in SETTINGS_BY_NAME:
                assert option.opts == [SETTINGS_BY_NAME[option.name].flag]


LOCK_DIRECTORIES = ("/run/lock", "/var/lock", "$XDG_RUNTIME_DIR")  # the order poller.lock.lock_directory tries


@pytest.mark.parametrize(
    "text",
    [SETTINGS_BY_NAME["lock_file"].help, settings_rows()["lock_file"][5]],
    ids=["help", "configuration.md"],
)
def test_lock_directories_in_code_order(text: str) -> None:
    positions = [text.find(directory) for directory in LOCK_DIRECTORIES]

    assert -1 not in positions
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", ["README.md", "docs/operations.md", "docs/cron.md"])
def test_install_steps_use_checkout(name: str) -> None:
    text = (DOC.parent.parent / name).read_text(encoding="utf-8")

    assert "install 'poller[" not in text


def test_readme_install_has_driver_extra() -> None:
    # The README's cron section configures PostgreSQL, so its install needs the driver.
    text = (DOC.parent.parent / "README.md").read_text(encoding="utf-8")

    assert "pip install '.[postgresql]'" in text
