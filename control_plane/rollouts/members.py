"""A rollout's devices as plain rows: read in one column query, written back in one set-based update.

The controller reads every member on every tick; ORM objects would cost more than the decision
(ADR 0006).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from control_plane.db import bulk
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
    return [Member(*row) for row in session.execute(stmt).all()]


def previous_desired(session: Session, rollout_id: str, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The desired state each device had before the rollout assigned it (for rollback)."""
    out: dict[str, dict[str, Any]] = {}
    for clause in bulk.matching(session, TABLE.c.device_id, device_ids):
        stmt = sa.select(TABLE.c.device_id, TABLE.c.previous_desired).where(TABLE.c.rollout_id == rollout_id, clause)
        out.update((device_id, previous) for device_id, previous in session.execute(stmt).all() if previous)
    return out


# What a rollback restores: each device's desired state as it was before the rollout replaced it,
# copied column to column by the database, never read into Python (ADR 0006).
_PREVIOUS_DESIRED = bulk.CopyFrom(
    column="previous_desired",
    source=DesiredStateRow.__table__.c.payload,  # type: ignore[attr-defined]
    on="device_id",
)


def insert(session: Session, rows: list[dict[str, Any]], *, keep_previous_desired: bool = False) -> None:
    """New members (rows without `previous_desired`); with `keep_previous_desired`, each row gets
    its device's desired state as it is now, before the rollout replaces it."""
    if keep_previous_desired:
        bulk.insert_copying(session, TABLE, rows, _PREVIOUS_DESIRED)
    else:
        bulk.insert(session, TABLE, [{**row, "previous_desired": None} for row in rows])


def save(
    session: Session, rollout_id: str, changes: list[dict[str, Any]], *, keep_previous_desired: bool = False
) -> None:
    """Write `changes` (each with device_id and the same other columns) to the rollout's members;
    with `keep_previous_desired`, as `insert` does, in the same statement."""
    rows = [{"rollout_id": rollout_id, **change} for change in changes]
    copy = _PREVIOUS_DESIRED if keep_previous_desired else None
    bulk.update(session, TABLE, rows, key=("rollout_id", "device_id"), copy=copy)
