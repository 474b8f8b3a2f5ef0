"""SQLite's bulk writer: one executemany per call (it runs in C already), IN lists of at most 900."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from control_plane.db.bulk_types import CopyFrom, Newer, Rows, guards

MAX_PARAMETERS = 900  # SQLite's limit on bound parameters per statement is 999


def _lookup(copy: CopyFrom) -> Any:
    """The copied value as a scalar subquery on the `_copy_key` parameter."""
    (key,) = copy.source.table.primary_key.columns
    return sa.select(copy.source).where(key == sa.bindparam("_copy_key")).scalar_subquery()


class SqliteBulk:
    def write(self, session: Session, batch: Rows, conflict: tuple[str, ...], update: tuple[str, ...] | None) -> int:
        table, rows = batch.table, batch.rows
        rows = _in_utc(table, rows)
        stmt: Any = sqlite_insert(table)
        if conflict and update:
            stmt = stmt.on_conflict_do_update(index_elements=list(conflict), set_={c: stmt.excluded[c] for c in update})
        elif conflict:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
        if conflict and not update:
            # RETURNING yields only the rows written, so skipped duplicates can be counted.
            return len(session.execute(stmt.returning(table.c[next(iter(rows[0]))]), list(rows)).all())
        session.execute(stmt, list(rows))
        return len(rows)

    def insert_copying(self, session: Session, batch: Rows, copy: CopyFrom) -> None:
        table, rows = batch.table, batch.rows
        rows = _in_utc(table, rows)
        session.execute(
            table.insert().values({copy.column: _lookup(copy)}), [{**row, "_copy_key": row[copy.on]} for row in rows]
        )

    def update(
        self, session: Session, batch: Rows, key: Sequence[str], copy: CopyFrom | None, newer: Newer | None = None
    ) -> None:
        table, rows = batch.table, batch.rows
        values = [c for c in rows[0] if c not in key]
        rows = _in_utc(table, rows)
        new_values: dict[str, Any] = {c: sa.bindparam(f"v_{c}") for c in values}
        for c, order in guards(values, newer).items():
            incoming, stored = sa.bindparam(f"v_{order}", type_=table.c[order].type), table.c[order]
            newest = sa.or_(incoming.is_(None), stored.is_(None), incoming > stored)
            # Typed: inside CASE the value does not take the column's type (a JSON column's dict) by itself.
            new_values[c] = sa.case((newest, sa.bindparam(f"v_{c}", type_=table.c[c].type)), else_=table.c[c])
        if copy is not None:
            new_values[copy.column] = _lookup(copy)
        stmt = table.update().where(*(table.c[c] == sa.bindparam(f"k_{c}") for c in key)).values(new_values)
        params_list = [{**{f"k_{c}": r[c] for c in key}, **{f"v_{c}": r[c] for c in values}} for r in rows]
        if copy is not None:
            params_list = [{**p, "_copy_key": r[copy.on]} for p, r in zip(params_list, rows, strict=True)]
        session.execute(stmt, params_list)

    def matching(self, column: Any, values: list[Any]) -> list[sa.ColumnElement[bool]]:
        return [column.in_(values[start : start + MAX_PARAMETERS]) for start in range(0, len(values), MAX_PARAMETERS)]


def _in_utc(table: sa.Table, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with aware timestamps moved to UTC: SQLAlchemy stores a SQLite timestamp as its
    wall-clock text without the offset, and every reader takes a naive one as UTC, so a device's
    window ending at 17:30+05:30 would otherwise read back five and a half hours late."""
    zoned = [c for c in rows[0] if c in table.c and isinstance(table.c[c].type, sa.DateTime)] if rows else []
    if not zoned:
        return list(rows)
    out = []
    for row in rows:
        moved = {c: row[c].astimezone(UTC) for c in zoned if row[c] is not None and row[c].tzinfo is not None}
        out.append({**row, **moved} if moved else row)
    return out
