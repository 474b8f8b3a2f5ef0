"""Device events (`device_events`): what devices reported about downloads, activations and rollbacks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlmodel import Session, col, select

from control_plane.models import DeviceEvent
from control_plane.services import pagination


def list_events(
    session: Session,
    *,
    device_id: str | None,
    kind: str | None,
    since: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[DeviceEvent], str | None]:
    """Events oldest first (keyset pages over (created_at, id)), optionally of one device and kind."""
    stmt = select(DeviceEvent)
    if device_id is not None:
        stmt = stmt.where(DeviceEvent.device_id == device_id)
    if kind is not None:
        stmt = stmt.where(DeviceEvent.kind == kind)
    if since is not None:
        stmt = stmt.where(col(DeviceEvent.created_at) >= _utc(since))
    stmt = pagination.apply_page(stmt, DeviceEvent.created_at, DeviceEvent.id, cursor, limit)
    return pagination.split_page(list(session.exec(stmt).all()), limit)


def latest_events(session: Session, device_ids: Sequence[str], limit: int) -> list[DeviceEvent]:
    """The newest events of these devices, newest first."""
    if not device_ids:
        return []
    stmt = (
        select(DeviceEvent)
        .where(col(DeviceEvent.device_id).in_(device_ids))
        .order_by(col(DeviceEvent.created_at).desc(), col(DeviceEvent.id).desc())
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def _utc(value: datetime) -> datetime:
    """`value` in UTC (SQLite compares stored UTC times as text); naive means UTC, and year 1 or 9999
    with an offset that leaves the calendar stays at its end."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.min if value.year == 1 else datetime.max).replace(tzinfo=UTC)
