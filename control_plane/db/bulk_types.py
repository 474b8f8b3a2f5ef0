"""What the bulk writers of every dialect share: the interface `bulk` dispatches to, and CopyFrom."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class CopyFrom:
    """Set `column` to `source` of the source table's row whose primary key equals the row's `on`
    value (NULL where there is none), read by the database itself: the value never travels to
    Python and back."""

    column: str
    source: sa.Column[Any]
    on: str


class BulkWriter(Protocol):
    """One dialect's set-based writes; `rows` is never empty and every row has the same keys."""

    def write(
        self,
        session: Session,
        table: sa.Table,
        rows: Sequence[dict[str, Any]],
        *,
        conflict: tuple[str, ...],
        update: tuple[str, ...] | None,
    ) -> int: ...

    def insert_copying(
        self, session: Session, table: sa.Table, rows: Sequence[dict[str, Any]], copy: CopyFrom
    ) -> None: ...

    def update(
        self,
        session: Session,
        table: sa.Table,
        rows: Sequence[dict[str, Any]],
        *,
        key: Sequence[str],
        copy: CopyFrom | None,
    ) -> None: ...

    def matching(self, column: Any, values: list[Any]) -> list[sa.ColumnElement[bool]]: ...
