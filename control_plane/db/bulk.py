"""Set-based writes of many plain rows: COPY and one statement per call on PostgreSQL,
executemany on SQLite.

On PostgreSQL the rows are copied into a temporary staging table (`_stage`) and written from it
with one INSERT or UPDATE, so 10,000 rows cost no per-row SQL (ADR 0006). SQLite's executemany
runs in C already.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session


def insert(
    session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], *, skip_conflicts_on: Sequence[str] = ()
) -> int:
    """Insert `rows` (every row with the same keys); with `skip_conflicts_on`, rows that collide
    with an existing one on those columns are skipped. Returns how many were inserted."""
    return _write(session, table, rows, conflict=tuple(skip_conflicts_on), update=None)


@dataclass(frozen=True)
class CopyFrom:
    """Set `column` to `source` of the source table's row whose primary key equals the row's `on`
    value (NULL where there is none), read by the database itself: the value never travels to
    Python and back."""

    column: str
    source: sa.Column[Any]
    on: str

    def join(self, q: Any) -> tuple[str, str]:
        """(the value's SQL, the LEFT JOIN that provides it) against staged rows named `u`."""
        src = self.source.table
        (key,) = src.primary_key.columns
        return f"s.{q(self.source.name)}", f"LEFT JOIN {q(src.name)} AS s ON s.{q(key.name)} = u.{q(self.on)}"

    def lookup(self) -> Any:
        """The value as a scalar subquery on the `_copy_key` parameter (executemany on SQLite)."""
        (key,) = self.source.table.primary_key.columns
        return sa.select(self.source).where(key == sa.bindparam("_copy_key")).scalar_subquery()


def insert_copying(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], copy: CopyFrom) -> None:
    """Insert `rows`, with `copy.column` of each taken from the source table (see CopyFrom)."""
    if not rows:
        return
    if _is_postgres(session):
        columns = list(rows[0])
        q = _quoter(session)
        names = ", ".join(q(c) for c in columns)
        stage = _stage(session, table, columns, rows)
        value, join = copy.join(q)
        session.execute(
            sa.text(
                f"INSERT INTO {q(table.name)} ({names}, {q(copy.column)}) "
                f"SELECT {', '.join(f'u.{q(c)}' for c in columns)}, {value} FROM {stage} AS u {join}"
            )
        )
        session.execute(sa.text(f"TRUNCATE {stage}"))
        return
    rows = _in_utc(table, rows)
    session.execute(
        table.insert().values({copy.column: copy.lookup()}), [{**row, "_copy_key": row[copy.on]} for row in rows]
    )


def upsert(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], *, key: Sequence[str]) -> None:
    """Insert `rows`, or overwrite every other given column where `key` already exists."""
    if rows:
        update = tuple(c for c in rows[0] if c not in key)
        _write(session, table, rows, conflict=tuple(key), update=update)


def update(
    session: Session,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
    copy: CopyFrom | None = None,
) -> None:
    """Set the non-key columns of each row on the table's row matching `key` (same keys in every
    row), and with `copy` one more column from another table (see CopyFrom)."""
    if not rows:
        return
    columns = list(rows[0])
    values = [c for c in columns if c not in key]
    if _is_postgres(session):
        q = _quoter(session)
        stage = _stage(session, table, columns, rows)
        assignments = [f"{q(c)} = u.{q(c)}" for c in values]
        join = ""
        if copy is not None:
            value, join = copy.join(q)
            assignments.append(f"{q(copy.column)} = {value}")
        match = " AND ".join(f"t.{q(c)} = u.{q(c)}" for c in key)
        sql = f"UPDATE {q(table.name)} AS t SET {', '.join(assignments)} FROM {stage} AS u {join} WHERE {match}"
        session.execute(sa.text(sql))
        session.execute(sa.text(f"TRUNCATE {stage}"))
        return
    rows = _in_utc(table, rows)
    new_values: dict[str, Any] = {c: sa.bindparam(f"v_{c}") for c in values}
    if copy is not None:
        new_values[copy.column] = copy.lookup()
    stmt = table.update().where(*(table.c[c] == sa.bindparam(f"k_{c}") for c in key)).values(new_values)
    params_list = [{**{f"k_{c}": r[c] for c in key}, **{f"v_{c}": r[c] for c in values}} for r in rows]
    if copy is not None:
        params_list = [{**p, "_copy_key": r[copy.on]} for p, r in zip(params_list, rows, strict=True)]
    session.execute(stmt, params_list)


def _write(
    session: Session,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    conflict: tuple[str, ...],
    update: tuple[str, ...] | None,
) -> int:
    if not rows:
        return 0
    columns = list(rows[0])
    if not _is_postgres(session):
        dialect = session.get_bind().dialect.name
        if dialect != "sqlite":
            raise NotImplementedError(f"no ON CONFLICT insert for {dialect}")
        rows = _in_utc(table, rows)
        stmt: Any = sqlite_insert(table)
        if conflict and update:
            stmt = stmt.on_conflict_do_update(index_elements=list(conflict), set_={c: stmt.excluded[c] for c in update})
        elif conflict:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
        if conflict and not update:
            # RETURNING yields only the rows written, so skipped duplicates can be counted.
            return len(session.execute(stmt.returning(table.c[columns[0]]), list(rows)).all())
        session.execute(stmt, list(rows))
        return len(rows)
    q = _quoter(session)
    names = ", ".join(q(c) for c in columns)
    stage = _stage(session, table, columns, rows)
    sql = f"INSERT INTO {q(table.name)} ({names}) SELECT {names} FROM {stage}"
    if conflict and update:
        sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in update)
        sql += f" ON CONFLICT ({', '.join(q(c) for c in conflict)}) DO UPDATE SET {sets}"
    elif conflict:
        sql += f" ON CONFLICT ({', '.join(q(c) for c in conflict)}) DO NOTHING"
    result = session.execute(sa.text(sql))
    written = result.rowcount if result.rowcount >= 0 else len(rows)  # type: ignore[attr-defined]
    session.execute(sa.text(f"TRUNCATE {stage}"))
    return int(written)


def _stage(session: Session, table: sa.Table, columns: list[str], rows: Sequence[dict[str, Any]]) -> str:
    """Copy `rows` into a temporary table of just these columns (one per connection, emptied at
    commit and after each use); returns its quoted name.

    COPY is the cheapest way into PostgreSQL, cheaper than one JSON document or array parameters
    (ADR 0006).
    """
    dialect = session.get_bind().dialect
    q = _quoter(session)
    shape = ",".join(f"{c}:{table.c[c].type.compile(dialect=dialect)}" for c in columns)
    name = q(f"_stage_{table.name}_{hashlib.sha1(shape.encode()).hexdigest()[:10]}")
    info = session.connection().info
    if name not in info.get(_STAGES_READY, ()):
        # Once per connection: the statement costs PostgreSQL even when the table exists (ADR 0006).
        definition = ", ".join(f"{q(c)} {table.c[c].type.compile(dialect=dialect)}" for c in columns)
        session.execute(sa.text(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({definition}) ON COMMIT DELETE ROWS"))
        info.setdefault(_STAGES_PENDING, set()).add(name)
    json_at = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
    time_at = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.DateTime)]
    values = operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor, cursor.copy(f"COPY {name} ({', '.join(q(c) for c in columns)}) FROM STDIN") as copy:
        # Values pass as they are but for JSON and timestamps (as text): a conversion per value,
        # psycopg's timestamp formatting included, would cost more than the copy (ADR 0006). ISO text
        # reads back as the same instant (naive values in the session's zone, as psycopg sends
        # them). Most rows of a batch share one timestamp object (the batch's clock reading): it
        # is formatted once per object, which `rows` keeps alive (not per equal value: the same
        # instant in two zones makes equal datetimes with different texts). The models' enums are
        # str and int enums, which psycopg's str and int dumpers write by value.
        formatted: dict[int, str] = {}
        for row in rows:
            out = list(values(row))
            for i in json_at:
                if out[i] is not None:
                    out[i] = orjson.dumps(out[i]).decode()
            for i in time_at:
                if (at := out[i]) is not None:
                    if (text := formatted.get(id(at))) is None:
                        text = formatted[id(at)] = at.isoformat()
                    out[i] = text
            copy.write_row(out)
    return name


# Staging tables known to exist on a connection (`Connection.info` lasts as long as the database
# connection does): a table counts once the transaction that created it commits, since a rollback
# (of the transaction or of a savepoint in it) takes the table away with it.
_STAGES_READY = "slmops_stages_ready"
_STAGES_PENDING = "slmops_stages_pending"


@sa.event.listens_for(sa.engine.Engine, "commit")
def _stages_committed(conn: sa.Connection) -> None:
    if pending := conn.info.pop(_STAGES_PENDING, None):
        conn.info.setdefault(_STAGES_READY, set()).update(pending)


@sa.event.listens_for(sa.engine.Engine, "rollback")
@sa.event.listens_for(sa.engine.Engine, "rollback_savepoint")
def _stages_rolled_back(conn: sa.Connection, *_: Any) -> None:
    conn.info.pop(_STAGES_PENDING, None)


@sa.event.listens_for(sa.pool.Pool, "reset")
def _stages_reset(_dbapi_connection: Any, record: Any, _reset_state: Any) -> None:
    # A connection returned to the pool mid-transaction is rolled back by the pool itself.
    record.info.pop(_STAGES_PENDING, None)


def matching(session: Session, column: Any, values: Sequence[Any]) -> list[sa.ColumnElement[bool]]:
    """`column` in `values`, as the clauses to run one query each with.

    PostgreSQL: one clause, `column = ANY(array)`, a single parameter however many values (an IN
    list of 10,000 binds costs the driver more to render and split than the query costs to run).
    Strings travel as one text that the server splits (`string_to_array`): psycopg dumps a list
    parameter element by element in Python (ADR 0006).
    SQLite: IN lists of at most 900 values (its limit on bound parameters per statement).
    """
    values = list(values)
    if not values:
        return []
    if _is_postgres(session):
        if (joined := _joined(values)) is not None:
            return [column == sa.any_(sa.func.string_to_array(sa.bindparam(None, joined, type_=sa.Text), _SEPARATOR))]
        from sqlalchemy.dialects.postgresql import ARRAY

        return [column == sa.any_(sa.bindparam(None, values, type_=ARRAY(column.type)))]
    return [column.in_(values[start : start + 900]) for start in range(0, len(values), 900)]


_SEPARATOR = "\x1f"  # ASCII unit separator: no device id, message id or name holds it (see `_joined`)


def _joined(values: list[Any]) -> str | None:
    """`values` as one text for `string_to_array`, or None where that would not split back into
    them: a value that is no string or holds the separator, or a lone empty string (which
    `string_to_array` reads as no element at all)."""
    if not all(isinstance(value, str) for value in values) or values == [""]:
        return None
    joined = _SEPARATOR.join(values)
    return joined if joined.count(_SEPARATOR) == len(values) - 1 else None


def _in_utc(table: sa.Table, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with aware timestamps moved to UTC, for SQLite: SQLAlchemy stores a SQLite timestamp
    as its wall-clock text without the offset, and every reader takes a naive one as UTC, so a
    device's window ending at 17:30+05:30 would otherwise read back five and a half hours late."""
    zoned = [c for c in rows[0] if c in table.c and isinstance(table.c[c].type, sa.DateTime)] if rows else []
    if not zoned:
        return list(rows)
    out = []
    for row in rows:
        moved = {c: row[c].astimezone(UTC) for c in zoned if row[c] is not None and row[c].tzinfo is not None}
        out.append({**row, **moved} if moved else row)
    return out


def _quoter(session: Session) -> Any:
    return session.get_bind().dialect.identifier_preparer.quote


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
