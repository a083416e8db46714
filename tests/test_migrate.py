"""`poller db upgrade` and `poller db current`, and the packaged migrations."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from poller import migrate
from tests.conftest import create_users

REPOSITORY = Path(__file__).resolve().parent.parent


def test_upgrade_creates_table(invoke: Any, database_url: str) -> None:
    result = invoke("db", "upgrade", "--database-url", database_url)

    assert result.exit_code == 0, result.stderr
    engine = sa.create_engine(database_url)
    tables = sa.inspect(engine).get_table_names()
    engine.dispose()
    assert "sent_notifications" in tables
    assert "poller_alembic_version" in tables
    assert "alembic_version" not in tables


def test_upgrade_twice_is_harmless(invoke: Any, database_url: str) -> None:
    invoke("db", "upgrade", "--database-url", database_url)
    second = invoke("db", "upgrade", "--database-url", database_url)

    assert second.exit_code == 0
    assert "already at the latest revision" in second.stderr


def test_schema_matches_models(database_url: str) -> None:
    # alembic check fails when the migrations and poller.schema disagree;
    # the users table beside them must not count as a difference.
    create_users(database_url, [])
    engine = sa.create_engine(database_url)
    migrate.upgrade(engine)

    migrate.check(engine)
    engine.dispose()


def test_upgrade_leaves_users_table_alone(invoke: Any, database_url: str) -> None:
    create_users(database_url, [{"id": 1, "email": "a@example.com", "points": 5}])
    engine = sa.create_engine(database_url)
    before = sa.inspect(engine).get_columns("users")

    invoke("db", "upgrade", "--database-url", database_url)

    after = sa.inspect(engine).get_columns("users")
    engine.dispose()
    assert [column["name"] for column in after] == [column["name"] for column in before]


def test_current_reports_revision(invoke: Any, database_url: str) -> None:
    invoke("db", "upgrade", "--database-url", database_url)

    result = invoke("db", "current", "--database-url", database_url)

    assert result.exit_code == 0
    assert result.stdout.startswith(f"{migrate.head_revision()} ")
    assert "up to date" in result.stdout


def test_current_on_empty_database(invoke: Any, sqlite_url: str) -> None:
    create_users(sqlite_url, [])

    result = invoke("db", "current", "--database-url", sqlite_url)

    assert result.exit_code == 0
    assert result.stdout.startswith("none ")
    assert "poller db upgrade" in result.stdout


def test_missing_sqlite_file_is_an_error(invoke: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"

    result = invoke("run", "--database-url", f"sqlite:///{missing}", "--mail-url", "console:")

    assert result.exit_code == 1
    assert str(missing) in result.stderr
    assert not missing.exists()


def test_installed_package_carries_migrations(tmp_path: Path) -> None:
    # A plain (non-editable) install, run from outside the source tree, must
    # find its migrations inside the installed package.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The dependencies come from this interpreter's site-packages through a
    # .pth file, so nothing is downloaded. Its own .pth files (such as the
    # editable install of this checkout) are not processed from there, so
    # `import poller` finds only the copy installed below.
    target = next((venv / "lib").glob("python3*/site-packages"))
    (target / "parent_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(REPOSITORY)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0:
        pytest.fail(f"pip install failed: {install.stderr}")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    database = workdir / "fresh.db"

    result = subprocess.run(
        [str(venv / "bin" / "poller"), "db", "upgrade", "--database-url", f"sqlite:///{database}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    location = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import poller.migrate as m; print(m.script_location())"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "site-packages" in location.stdout
    assert "sent_notifications" in sa.inspect(sa.create_engine(f"sqlite:///{database}")).get_table_names()
