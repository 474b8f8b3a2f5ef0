"""A wheel of the project carries the schema migrations, so a server installed from it can create
its tables (`slmops db upgrade`)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_server_from_the_wheel_migrates_an_empty_database(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("slmops-*.whl"))
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    database = tmp_path / "fresh.db"
    script = (
        "import control_plane.db as db, sys; "
        "assert db.__file__.startswith(sys.argv[1]), db.__file__; "
        "db.upgrade('sqlite:///' + sys.argv[2])"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(unpacked), str(database)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tables = set(sa.inspect(sa.create_engine(f"sqlite:///{database}")).get_table_names())
    assert {"models", "devices", "rollouts", "alembic_version"} <= tables
