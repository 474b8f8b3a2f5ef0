"""Set-based writes of many plain rows, and reads of rows matching many values, through one bulk
writer per dialect chosen once from the session's dialect: `bulk_postgres` (COPY into a staging
table, one statement per call) or `bulk_sqlite` (executemany). Callers use these functions alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from control_plane.db.bulk_postgres import PostgresBulk
from control_plane.db.bulk_sqlite import SqliteBulk
from control_plane.db.bulk_types import BulkWriter, CopyFrom, Newer, Rows

__all__ = ["CopyFrom", "insert", "insert_copying", "matching", "update", "upsert", "writer_for"]


def writer_for(session: Session) -> BulkWriter:
    """The bulk writer of the session's dialect (one per dialect object, made on first use)."""
    dialect = session.get_bind().dialect
    writer = _WRITERS.get(dialect)
    if writer is None:
        if dialect.name == "postgresql":
            writer = PostgresBulk(dialect)
        elif dialect.name == "sqlite":
            writer = SqliteBulk()
        else:
            raise NotImplementedError(f"no bulk writer for {dialect.name}")
        writer = _WRITERS.setdefault(dialect, writer)
    return writer


_WRITERS: weakref.WeakKeyDictionary[sa.Dialect, BulkWriter] = weakref.WeakKeyDictionary()


def insert(
    session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], *, skip_conflicts_on: Sequence[str] = ()
) -> int:
    """Insert `rows` (every row with the same keys); with `skip_conflicts_on`, rows that collide
    with an existing one on those columns are skipped. Returns how many were inserted."""
    if not rows:
        return 0
    return writer_for(session).write(session, Rows(table, rows), tuple(skip_conflicts_on), None)


def insert_copying(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], copy: CopyFrom) -> None:
    """Insert `rows`, with `copy.column` of each taken from the source table (see CopyFrom)."""
    if rows:
        writer_for(session).insert_copying(session, Rows(table, rows), copy)


def upsert(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], *, key: Sequence[str]) -> None:
    """Insert `rows`, or overwrite every other given column where `key` already exists."""
    if rows:
        update = tuple(c for c in rows[0] if c not in key)
        writer_for(session).write(session, Rows(table, rows), tuple(key), update)


def update(
    session: Session,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
    copy: CopyFrom | None = None,
    newer: Newer | None = None,
) -> None:
    """Set the non-key columns of each row on the table's row matching `key` (same keys in every
    row), and with `copy` one more column from another table (see CopyFrom).

    `newer`: {order column: the columns it guards}. Those columns, the order column with them, are
    set only where the row's order is higher than the stored one (or either is NULL), decided in
    the same statement: two writers racing leave the newest values whichever commits last."""
    if rows:
        writer_for(session).update(session, Rows(table, rows), key, copy, newer)


def matching(session: Session, column: Any, values: Sequence[Any]) -> list[sa.ColumnElement[bool]]:
    """`column` in `values`, as the clauses to run one query each with (PostgreSQL: one clause
    with a single parameter; SQLite: IN lists within its limit on bound parameters)."""
    values = list(values)
    return writer_for(session).matching(column, values) if values else []
