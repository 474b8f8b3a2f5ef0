"""Migrations are the only source of the schema: upgrade matches the models, downgrade empties it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import control_plane.models  # noqa: F401
from control_plane import db
from tests.conftest import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_head_matches_models_and_downgrade_to_base(backend: str, fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url(backend)
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        assert db.is_at_head(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, SQLModel.metadata)
        assert diff == [], f"models and migrations differ: {diff}"

        db.downgrade(url, "base")
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
        assert db.current_revision(engine) is None

        db.upgrade(url)  # and back up again: the downgrade left nothing behind that blocks it
        assert set(SQLModel.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_replicas_starting_together_on_an_empty_database_migrate_it_once(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    """Every `slmops server` upgrades the schema at start: two replicas started at once must not
    both create the tables (losers failed with UniqueViolation before migrations took a lock)."""
    url = fresh_database_url("postgres")
    upgrade = "import sys; from control_plane import db; db.upgrade(sys.argv[1])"
    replicas = [
        subprocess.Popen([sys.executable, "-c", upgrade, url], stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    results = [(proc.communicate(timeout=120)[1], proc.returncode) for proc in replicas]
    assert [rc for _, rc in results] == [0, 0, 0], [
        [x for x in err.splitlines() if "Error:" in x][:1] for err, _ in results
    ]
    engine = db.make_engine(url)
    try:
        assert db.is_at_head(engine)
    finally:
        engine.dispose()
