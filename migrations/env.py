"""Alembic environment: the URL comes from the caller (control_plane.db) or SLMOPS_DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text
from sqlmodel import SQLModel

import control_plane.models  # noqa: F401  (fills the metadata)

config = context.config
MIGRATION_LOCK_KEY = 0x510_0DB0  # arbitrary, fixed: "slmops migrations" (the controller's is 0x510_0AE5)
target_metadata = SQLModel.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from control_plane.config import Settings

    return Settings().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        section = {"sqlalchemy.url": _url()}
        connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # Batch mode rebuilds tables on SQLite, which cannot ALTER most constraints in place.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas upgrade at start: one migrates, the others wait here, then find the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        context.run_migrations()
    connection.commit() if hasattr(connection, "commit") and connection.in_transaction() else None


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
