"""Settings validation: values out of range are exit-2 errors that name the option."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from poller.errors import ConfigError
from poller.settings import MAX_THRESHOLD, load_settings
from tests.conftest import SMTPServer, create_users, upgrade


@pytest.fixture
def sqlite_app(sqlite_url: str) -> str:
    """A migrated SQLite database with one user at 150 points."""
    create_users(sqlite_url, [{"id": 1, "email": "ada@example.com", "points": 150, "name": "Ada"}])
    upgrade(sqlite_url)
    return sqlite_url


@pytest.mark.parametrize("threshold", ["1e20", "1e400", "-5", "0", "1000000000000001"])
def test_run_rejects_threshold_out_of_range(
    invoke: Any, sqlite_app: str, smtp_server: SMTPServer, threshold: str
) -> None:
    result = invoke("run", "--database-url", sqlite_app, "--mail-url", smtp_server.url, "--threshold", threshold)

    assert result.exit_code == 2
    assert "--threshold" in result.stderr
    assert "greater than 0 and at most 1000000000000000" in result.stderr
    assert smtp_server.sink.received == []


def test_pending_rejects_huge_threshold(invoke: Any, sqlite_app: str) -> None:
    result = invoke("pending", "--database-url", sqlite_app, "--threshold", "1e400")

    assert result.exit_code == 2
    assert "--threshold" in result.stderr


def test_threshold_from_environment_names_variable(invoke: Any, sqlite_app: str) -> None:
    result = invoke("pending", "--database-url", sqlite_app, env={"POLLER_THRESHOLD": "-1"})

    assert result.exit_code == 2
    assert "POLLER_THRESHOLD" in result.stderr


def test_largest_threshold_is_accepted() -> None:
    settings = load_settings({"threshold": str(MAX_THRESHOLD)}, environ={})

    assert settings.threshold == Decimal(10**15)


def test_largest_threshold_runs(invoke: Any, sqlite_app: str, smtp_server: SMTPServer) -> None:
    result = invoke("run", "--database-url", sqlite_app, "--mail-url", smtp_server.url, "--threshold", "1e15")

    assert result.exit_code == 0, result.output
    assert smtp_server.sink.received == []


@pytest.mark.parametrize("threshold", ["1e20", "-5", "0"])
def test_rule_threshold_out_of_range_names_rule(tmp_path: Path, threshold: str) -> None:
    config = tmp_path / "poller.toml"
    config.write_text(f'[[rules]]\nname = "gold"\nthreshold = {threshold}\n', encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_settings({}, environ={}, config_path=config)

    assert "rule 'gold'" in str(raised.value)
    assert "greater than 0 and at most" in str(raised.value)


def test_config_threshold_out_of_range_names_key(tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text("threshold = -5\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_settings({}, environ={}, config_path=config)

    assert "key 'threshold'" in str(raised.value)


def test_unknown_config_key_suggests_closest(tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text('databse_url = "sqlite:////tmp/app.db"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_settings({}, environ={}, config_path=config)

    assert "unknown key 'databse_url'" in str(raised.value)
    assert "Did you mean 'database_url'?" in str(raised.value)
    assert "poller config show" in str(raised.value)


def test_unknown_config_key_without_close_match(tmp_path: Path) -> None:
    config = tmp_path / "poller.toml"
    config.write_text("colour = 3\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_settings({}, environ={}, config_path=config)

    assert "Did you mean" not in str(raised.value)
