"""`/v1/telemetry`: fleet summary, per-version and per-device series, rollout progress (viewer)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlmodel import col, select

from control_plane.api.deps import IsoDatetime, SessionDep, ViewerDep
from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Device, GateEvaluation, Rollout, as_utc, utcnow
from control_plane.services import pagination
from control_plane.telemetry.series import SeriesQuery, series
from control_plane.telemetry.summary import fleet_summary, rollout_progress

router = APIRouter(prefix="/v1/telemetry", tags=["telemetry"])
_STEP = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
StepParam = Annotated[str, Query(description="seconds, or with a unit: 30s, 5m, 1h, 1d")]


MAX_STEP_S = 366 * 86400
# Series times are Unix-epoch based: outside these bounds they cannot be floored to a step.
EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def parse_step(step: str) -> int:
    match = _STEP.match(step.strip()[:32])
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not 1 <= seconds <= MAX_STEP_S:
        raise DomainError(
            ErrorCode.VALIDATION_ERROR,
            f"step {step[:32]!r} is not a duration like 60, 30s, 5m or 1h of at most 366 days",
        )
    return seconds


def _range(start: datetime | None, end: datetime | None, step_s: int) -> tuple[datetime, datetime]:
    end_utc = _bounded(end, "end") or utcnow()
    start_utc = _bounded(start, "start") or max(EARLIEST, end_utc - timedelta(seconds=step_s * 60))
    return start_utc, end_utc


def _bounded(value: datetime | None, name: str) -> datetime | None:
    utc = as_utc(value)
    if utc is not None and not EARLIEST <= utc < LATEST:
        raise DomainError(ErrorCode.VALIDATION_ERROR, f"`{name}` must be between {EARLIEST.date()} and {LATEST.date()}")
    return utc


@router.get("/summary")
def get_summary(session: SessionDep, _: ViewerDep, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """Devices by status and by model version; offline, incompatible and not-on-desired lists."""
    return fleet_summary(session, limit=limit)


@router.get("/versions")
def get_version_series(
    session: SessionDep,
    _: ViewerDep,
    model: str,
    version: str,
    start: IsoDatetime | None = None,
    end: IsoDatetime | None = None,
    step: StepParam = "60",
) -> dict[str, Any]:
    """p50/p95/p99 latency, TTFT, tokens/s, RSS and error rate of one version across the fleet."""
    step_s = parse_step(step)
    start_utc, end_utc = _range(start, end, step_s)
    query = SeriesQuery(start=start_utc, end=end_utc, step_s=step_s, model=model, version=version)
    return series(session, query)


@router.get("/devices/{device_id}")
def get_device_series(
    device_id: str,
    session: SessionDep,
    _: ViewerDep,
    start: IsoDatetime | None = None,
    end: IsoDatetime | None = None,
    step: StepParam = "60",
    model: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """One device's telemetry over time (all versions it served, unless narrowed)."""
    if session.get(Device, device_id) is None:
        raise DomainError(ErrorCode.DEVICE_NOT_FOUND, f"no device {device_id}")
    step_s = parse_step(step)
    start_utc, end_utc = _range(start, end, step_s)
    query = SeriesQuery(start=start_utc, end=end_utc, step_s=step_s, model=model, version=version, device_id=device_id)
    return series(session, query)


@router.get("/rollouts/{rollout_id}")
def get_rollout_progress(
    rollout_id: str,
    session: SessionDep,
    _: ViewerDep,
    limit: int = Query(200, ge=1, le=pagination.MAX_LIMIT),
    cursor: str | None = None,
) -> dict[str, Any]:
    """Gate evaluations oldest first, as a series; `next_cursor` pages on."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise DomainError(ErrorCode.ROLLOUT_NOT_FOUND, f"no rollout {rollout_id}")
    stmt = select(GateEvaluation).where(GateEvaluation.rollout_id == rollout_id)
    stmt = pagination.apply_page(stmt, col(GateEvaluation.created_at), col(GateEvaluation.id), cursor, limit)
    page, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    return {**rollout_progress(session, rollout, page), "next_cursor": next_cursor}
