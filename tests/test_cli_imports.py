"""Commands that cron and shells run often must not pay for importing SQLAlchemy or Alembic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from poller.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="poller", standalone_mode=False)
finally:
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("sqlalchemy", "alembic"))
    print(json.dumps(heavy), file=sys.stderr)
"""


def heavy_modules(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stderr.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("args", [("--help",), ("cron", "--help"), ("cron", "show", "--file", "{tmp}/poller")])
def test_command_skips_sqlalchemy(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "poller").write_text("@daily root /opt/p run # poller-job:poller\n")

    loaded = heavy_modules(*(arg.format(tmp=tmp_path) for arg in args))

    assert loaded == []


def test_probe_sees_sqlalchemy_when_loaded(tmp_path: Path) -> None:
    # The probe must be able to fail: `db upgrade` does import SQLAlchemy.
    loaded = heavy_modules("db", "upgrade", "--database-url", f"sqlite:///{tmp_path / 'new.db'}")

    assert "sqlalchemy" in loaded
