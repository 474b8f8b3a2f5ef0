"""Test fixtures: every database test runs on SQLite and on the real PostgreSQL at 127.0.0.1:5432.

`SLMOPS_TEST_DATABASES` (default "sqlite,postgres") picks the backends; each session creates a fresh
PostgreSQL database and drops it at the end. Tables are emptied after each test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from control_plane import db
from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import Role
from control_plane.services import auth

PG_ADMIN_URL = os.environ.get("SLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BACKENDS = [b.strip() for b in os.environ.get("SLMOPS_TEST_DATABASES", "sqlite,postgres").split(",") if b]

pytest_plugins = ["tests.support.model_fixtures"]


def _create_pg_database() -> tuple[str, str]:
    name = f"slmops_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(name: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def fresh_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[callable]:  # type: ignore[valid-type]
    """A factory of empty databases (no schema) for migration tests."""
    created: list[str] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
        name, url = _create_pg_database()
        created.append(name)
        return url

    yield make
    for name in created:
        _drop_pg_database(name)


@pytest.fixture(scope="session", params=BACKENDS)
def db_url(request: pytest.FixtureRequest, fresh_database_url) -> str:  # type: ignore[no-untyped-def]
    url = fresh_database_url(request.param)
    db.upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = db.make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=db_url, max_upload_bytes=20 * 1024 * 1024, fleet_enabled=False
    )


@pytest.fixture
def app(settings: Settings, engine: sa.Engine):  # type: ignore[no-untyped-def]
    application = create_app(settings, engine=engine)
    yield application
    _empty_tables(engine)


@pytest.fixture
def empty_tables(engine: sa.Engine) -> Iterator[sa.Engine]:
    """For tests that write through `engine` alone: the next test starts from empty tables."""
    yield engine
    _empty_tables(engine)


def _empty_tables(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app) as test_client:
        yield test_client


def _token(engine: sa.Engine, role: Role) -> str:
    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name=f"test-{role.name}", role=role)
        session.commit()
    return plaintext


@pytest.fixture
def admin_headers(app, engine: sa.Engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {_token(engine, Role.admin)}"}


@pytest.fixture
def operator_headers(app, engine: sa.Engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {_token(engine, Role.operator)}"}


@pytest.fixture
def viewer_headers(app, engine: sa.Engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"Authorization": f"Bearer {_token(engine, Role.viewer)}"}
