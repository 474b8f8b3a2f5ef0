"""A rollout's devices as plain rows: read in one column query, written back in one set-based update.

The controller reads every member on every tick; ORM objects (identity map, deferred-column
loaders, unit-of-work flush) cost more than the whole decision at 10,000 devices (cProfile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from control_plane import bulk
from control_plane.models import DesiredStateRow, RolloutDevice

TABLE: sa.Table = RolloutDevice.__table__  # type: ignore[attr-defined]


@dataclass
class Member:
    device_id: str
    stage_index: int  # -1: in the target set, not yet assigned
    status: str  # waiting|assigned|active|failed|incompatible|rolled_back
    artifact_sha256: str | None


def load(session: Session, rollout_id: str) -> list[Member]:
    """Members in their stable pseudo-random order (the first ones are the canaries)."""
    stmt = (
        sa.select(TABLE.c.device_id, TABLE.c.stage_index, TABLE.c.status, TABLE.c.artifact_sha256)
        .where(TABLE.c.rollout_id == rollout_id)
        .order_by(TABLE.c.order_key)
    )
    return [Member(*row) for row in session.execute(stmt)]


def previous_desired(session: Session, rollout_id: str, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The desired state each device had before the rollout assigned it (for rollback)."""
    out: dict[str, dict[str, Any]] = {}
    for clause in bulk.matching(session, TABLE.c.device_id, device_ids):
        stmt = sa.select(TABLE.c.device_id, TABLE.c.previous_desired).where(TABLE.c.rollout_id == rollout_id, clause)
        out.update((device_id, previous) for device_id, previous in session.execute(stmt) if previous)
    return out


def insert(session: Session, rows: list[dict[str, Any]], *, keep_previous_desired: bool = False) -> None:
    """New members (rows without `previous_desired`); with `keep_previous_desired`, each row gets
    its device's desired state as it is now, before the rollout replaces it."""
    if not keep_previous_desired:
        bulk.insert(session, TABLE, [{**row, "previous_desired": None} for row in rows])
        return
    desired = DesiredStateRow.__table__  # type: ignore[attr-defined]
    bulk.insert_copying(session, TABLE, rows, column="previous_desired", source=desired.c.payload, on="device_id")


def keep_previous_desired(session: Session, rollout_id: str, device_ids: list[str]) -> None:
    """Copy each device's desired state, as it is before the rollout replaces it, to its member row.

    In SQL, column to column: reading thousands of JSON payloads into Python only to write them
    back was most of the time a rollout's first request took (py-spy)."""
    desired = DesiredStateRow.__table__  # type: ignore[attr-defined]
    current = sa.select(desired.c.payload).where(desired.c.device_id == TABLE.c.device_id).scalar_subquery()
    for clause in bulk.matching(session, TABLE.c.device_id, device_ids):
        session.execute(
            TABLE.update().where(TABLE.c.rollout_id == rollout_id, clause).values(previous_desired=current),
            execution_options={"synchronize_session": False},
        )


def save(session: Session, rollout_id: str, changes: list[dict[str, Any]]) -> None:
    """Write `changes` (each with device_id and the same other columns) to the rollout's members."""
    rows = [{"rollout_id": rollout_id, **change} for change in changes]
    bulk.update(session, TABLE, rows, key=("rollout_id", "device_id"))
