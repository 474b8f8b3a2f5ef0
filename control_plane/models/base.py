"""Column helpers shared by every table: UUID string keys, timezone-aware UTC timestamps, JSON."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

# Constraint names are deterministic so alembic can drop and alter them on every backend.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def id_field() -> Any:
    return Field(default_factory=new_id, primary_key=True, max_length=36)


def created_at_field(index: bool = False) -> Any:
    return Field(
        default_factory=utcnow,
        sa_column_kwargs={"nullable": False},
        sa_type=sa.DateTime(timezone=True),  # type: ignore[call-overload]
        index=index,
    )


def ts_field(index: bool = False) -> Any:
    return Field(default=None, sa_type=sa.DateTime(timezone=True), index=index)  # type: ignore[call-overload]


def json_field(default_factory: Any = dict) -> Any:
    return Field(default_factory=default_factory, sa_type=sa.JSON, sa_column_kwargs={"nullable": False})
