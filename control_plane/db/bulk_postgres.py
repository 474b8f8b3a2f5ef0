"""PostgreSQL's bulk writer: rows are copied (COPY) into a temporary staging table and written
from it with one INSERT or UPDATE, so 10,000 rows cost no per-row SQL (ADR 0006).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from control_plane.db.bulk_types import CopyFrom, Newer, Rows, guards


class PostgresBulk:
    def __init__(self, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self.q = dialect.identifier_preparer.quote

    def _join(self, copy: CopyFrom) -> tuple[str, str]:
        """(the copied value's SQL, the LEFT JOIN that provides it) against staged rows named `u`."""
        q, src = self.q, copy.source.table
        (key,) = src.primary_key.columns
        return f"s.{q(copy.source.name)}", f"LEFT JOIN {q(src.name)} AS s ON s.{q(key.name)} = u.{q(copy.on)}"

    def write(self, session: Session, batch: Rows, conflict: tuple[str, ...], update: tuple[str, ...] | None) -> int:
        table, rows = batch.table, batch.rows
        q, columns = self.q, list(rows[0])
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

    def insert_copying(self, session: Session, batch: Rows, copy: CopyFrom) -> None:
        table, rows = batch.table, batch.rows
        q, columns = self.q, list(rows[0])
        names = ", ".join(q(c) for c in columns)
        stage = _stage(session, table, columns, rows)
        value, join = self._join(copy)
        session.execute(
            sa.text(
                f"INSERT INTO {q(table.name)} ({names}, {q(copy.column)}) "
                f"SELECT {', '.join(f'u.{q(c)}' for c in columns)}, {value} FROM {stage} AS u {join}"
            )
        )
        session.execute(sa.text(f"TRUNCATE {stage}"))

    def update(
        self, session: Session, batch: Rows, key: Sequence[str], copy: CopyFrom | None, newer: Newer | None = None
    ) -> None:
        table, rows = batch.table, batch.rows
        q, columns = self.q, list(rows[0])
        stage = _stage(session, table, columns, rows)
        values = [c for c in columns if c not in key]
        guard_of = guards(values, newer)

        def assign(c: str) -> str:
            if (order := guard_of.get(c)) is None:
                return f"{q(c)} = u.{q(c)}"
            o = q(order)  # every SET expression reads the row as it was: the order column included
            return f"{q(c)} = CASE WHEN u.{o} IS NULL OR t.{o} IS NULL OR u.{o} > t.{o} THEN u.{q(c)} ELSE t.{q(c)} END"

        assignments = [assign(c) for c in values]
        join = ""
        if copy is not None:
            value, join = self._join(copy)
            assignments.append(f"{q(copy.column)} = {value}")
        match = " AND ".join(f"t.{q(c)} = u.{q(c)}" for c in key)
        sql = f"UPDATE {q(table.name)} AS t SET {', '.join(assignments)} FROM {stage} AS u {join} WHERE {match}"
        session.execute(sa.text(sql))
        session.execute(sa.text(f"TRUNCATE {stage}"))

    def matching(self, column: Any, values: list[Any]) -> list[sa.ColumnElement[bool]]:
        """One clause, `column = ANY(array)`: a single parameter however many values (an IN list of
        10,000 binds costs the driver more to render and split than the query costs to run).
        Strings travel as one text that the server splits (`string_to_array`): psycopg dumps a list
        parameter element by element in Python (ADR 0006)."""
        if (joined := _joined(values)) is not None:
            return [column == sa.any_(sa.func.string_to_array(sa.bindparam(None, joined, type_=sa.Text), _SEPARATOR))]
        return [column == sa.any_(sa.bindparam(None, values, type_=ARRAY(column.type)))]


def _stage(session: Session, table: sa.Table, columns: list[str], rows: Sequence[dict[str, Any]]) -> str:
    """Copy `rows` into a temporary table of just these columns (one per connection, emptied at
    commit and after each use); returns its quoted name.

    COPY is the cheapest way into PostgreSQL, cheaper than one JSON document or array parameters
    (ADR 0006).
    """
    dialect = session.get_bind().dialect
    q = dialect.identifier_preparer.quote
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


_SEPARATOR = "\x1f"  # ASCII unit separator: no device id, message id or name holds it (see `_joined`)


def _joined(values: list[Any]) -> str | None:
    """`values` as one text for `string_to_array`, or None where that would not split back into
    them: a value that is no string or holds the separator, or a lone empty string (which
    `string_to_array` reads as no element at all)."""
    if not all(isinstance(value, str) for value in values) or values == [""]:
        return None
    joined = _SEPARATOR.join(values)
    return joined if joined.count(_SEPARATOR) == len(values) - 1 else None
