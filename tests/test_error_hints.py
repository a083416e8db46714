"""Error messages that name the value at fault and the fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from poller import db
from poller.errors import ConfigError, DatabaseError
from poller.message import InvalidRow, normalize_address


def test_upgrade_into_missing_directory(invoke: Any, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "dir"

    result = invoke("db", "upgrade", "--database-url", f"sqlite:///{missing / 'x.db'}")

    assert result.exit_code == 1
    assert f"The directory '{missing}'" in result.stderr
    assert "does not exist" in result.stderr
    assert "--database-url" in result.stderr
    assert "unable to open database file" not in result.stderr
    assert not missing.exists()


def test_unknown_database_type_is_usage_error(invoke: Any) -> None:
    result = invoke("db", "upgrade", "--database-url", "foo://bar")

    assert result.exit_code == 2
    assert "--database-url 'foo://bar'" in result.stderr
    assert "sqlite:" in result.stderr
    assert "postgresql+psycopg://" in result.stderr
    assert "mysql+pymysql://" in result.stderr
    assert "Can't load plugin" not in result.stderr


def test_missing_mysqldb_suggests_pymysql() -> None:
    with pytest.raises(ConfigError) as raised:
        db.create_engine("mysql://app@127.0.0.1/app")

    assert "mysql+pymysql://" in str(raised.value)
    assert "pip install PyMySQL" in str(raised.value)
    assert "poller[" not in str(raised.value)


def test_missing_psycopg_suggests_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # An uninstalled driver cannot be made real in a test environment that
    # installs every extra, so the import is blocked instead.
    monkeypatch.setitem(sys.modules, "psycopg", None)

    with pytest.raises(ConfigError) as raised:
        db.create_engine("postgresql+psycopg://app@127.0.0.1/app")

    assert "(psycopg)" in str(raised.value)
    assert "pip install 'psycopg[binary]'" in str(raised.value)
    assert "pip install '.[postgresql]'" in str(raised.value)
    assert "poller[" not in str(raised.value)


def test_missing_sqlite_file_still_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError) as raised:
        db.create_engine(f"sqlite:///{tmp_path / 'absent.db'}")

    assert "does not exist" in str(raised.value)


def test_cron_install_names_password_variable(invoke: Any, tmp_path: Path) -> None:
    cron_file = tmp_path / "poller"

    result = invoke(
        "cron", "install", "--schedule", "@daily", "--file", str(cron_file),
        env={"POLLER_DATABASE_URL": "postgresql+psycopg://app:s3cret@127.0.0.1/app"},
    )  # fmt: skip

    assert result.exit_code == 2
    assert "POLLER_DATABASE_URL contains a password" in result.stderr
    assert "--database-url contains" not in result.stderr
    assert "s3cret" not in result.output
    assert not cron_file.exists()


@pytest.mark.parametrize("address", ["no-at-sign.example.com", "@example.com", "ada@"])
def test_address_without_parts_explains_form(address: str) -> None:
    with pytest.raises(InvalidRow) as raised:
        normalize_address(address)

    assert str(raised.value) == "email must have a local part, one '@' and a domain"
