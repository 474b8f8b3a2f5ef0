"""`/v1/devices/{id}/events` and `/v1/events`: what devices reported (download errors included)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from sqlmodel import Session

from control_plane.api.deps import IsoDatetime, SessionDep, ViewerDep
from control_plane.schemas import DeviceEventPublic, Page
from control_plane.services import devices, events
from shared.messages import EventKind

router = APIRouter(tags=["events"])

TypeQuery = Query(None, alias="type", description="only events of this kind, e.g. download_failed")
SinceQuery = Query(None, description="only events stored at or after this time (ISO 8601)")


@router.get("/v1/devices/{device_id}/events", response_model=Page[DeviceEventPublic])
def device_events(
    device_id: str,
    session: SessionDep,
    _: ViewerDep,
    kind: EventKind | None = TypeQuery,
    since: IsoDatetime | None = SinceQuery,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    """One device's events, oldest first; `next_cursor` pages on."""
    device = devices.get_device(session, device_id)
    return _page(session, device.id, kind, since, cursor, limit)


@router.get("/v1/events", response_model=Page[DeviceEventPublic])
def fleet_events(
    session: SessionDep,
    _: ViewerDep,
    device: str | None = Query(None, description="a device id or name"),
    kind: EventKind | None = TypeQuery,
    since: IsoDatetime | None = SinceQuery,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    """Events of the whole fleet (or of `device`), oldest first."""
    device_id = devices.get_device(session, device).id if device else None
    return _page(session, device_id, kind, since, cursor, limit)


def _page(
    session: Session, device_id: str | None, kind: str | None, since: datetime | None, cursor: str | None, limit: int
) -> Page[DeviceEventPublic]:
    rows, next_cursor = events.list_events(
        session, device_id=device_id, kind=kind, since=since, cursor=cursor, limit=limit
    )
    return Page[DeviceEventPublic](data=[DeviceEventPublic.model_validate(r) for r in rows], next_cursor=next_cursor)
