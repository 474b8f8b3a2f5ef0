"""What the bulk writers of every dialect share: the interface `bulk` dispatches to, and CopyFrom."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


@dataclass(frozen=True)
class Rows:
    """Rows for `table`: never empty, every row with the same keys (the columns written)."""

    table: sa.Table
    rows: Sequence[dict[str, Any]]


# {order column: the columns it guards}: see bulk.update.
Newer = Mapping[str, Sequence[str]]


def guards(values: Sequence[str], newer: Newer | None) -> dict[str, str]:
    """Each column of `values` that an order column also in `values` guards (the order column
    itself included) -> that order column."""
    guard_of = {c: order for order, guarded in (newer or {}).items() if order in values for c in (order, *guarded)}
    return {c: order for c, order in guard_of.items() if c in values}


class BulkWriter(Protocol):
    """One dialect's set-based writes."""

    def write(self, session: Session, batch: Rows, conflict: tuple[str, ...], update: tuple[str, ...] | None) -> int:
        """Insert; on `conflict` columns, skip the row or (with `update`) overwrite those columns."""

    def insert_copying(self, session: Session, batch: Rows, copy: CopyFrom) -> None: ...

    def update(
        self, session: Session, batch: Rows, key: Sequence[str], copy: CopyFrom | None, newer: Newer | None = None
    ) -> None: ...

    def matching(self, column: Any, values: list[Any]) -> list[sa.ColumnElement[bool]]: ...
