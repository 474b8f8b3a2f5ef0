"""Time series of a model version (fleet-wide) or of one device, one point per `step_s`.

Steps that are whole hours read the hour rollups, whole minutes the minute rollups, anything else
the raw windows. Windows that arrived after the rollup job's last pass (its watermark) are added
from the raw table, so the newest points are never missing and a query reads at most one
rollup interval of raw windows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import TelemetryRecord
from control_plane.telemetry.aggregate import RAW_COLUMNS, Aggregate
from control_plane.telemetry.pg_group import grouped_windows_pg
from control_plane.telemetry.rollup import HOUR, MINUTE, TEN_SECONDS, floor_time, rollup_watermark
from control_plane.telemetry.tables import DeviceRollup, VersionRollup

MAX_POINTS = 1440


@dataclass(frozen=True)
class SeriesQuery:
    start: datetime
    end: datetime
    step_s: int
    model: str | None = None
    version: str | None = None
    device_id: str | None = None

    def buckets(self) -> list[datetime]:
        if self.end <= self.start:
            raise DomainError(ErrorCode.VALIDATION_ERROR, "`end` must be after `start`")
        first = floor_time(self.start, self.step_s)
        count = -(-int((self.end - first).total_seconds()) // self.step_s)
        if count > MAX_POINTS:
            raise DomainError(
                ErrorCode.TOO_MANY_POINTS,
                f"{count} points asked for; at most {MAX_POINTS}: use a larger step or a shorter range",
                max_points=MAX_POINTS,
            )
        return [first + timedelta(seconds=i * self.step_s) for i in range(count)]


def resolution_for(step_s: int, device_id: str | None = None) -> int | None:
    """The coarsest rollup a step can be built from; None: raw windows only."""
    if step_s % HOUR == 0:
        return HOUR
    if step_s % MINUTE == 0:
        return MINUTE
    if step_s % TEN_SECONDS == 0 and device_id is None:  # 10 s rows exist per version, not per device
        return TEN_SECONDS
    return None


def _add_rollups(
    session: Session, query: SeriesQuery, resolution: int, start: datetime, end: datetime, into: Any
) -> None:
    table = DeviceRollup if query.device_id else VersionRollup
    stmt = sa.select(table).where(
        col(table.resolution_s) == resolution,
        col(table.bucket_start) >= start,
        col(table.bucket_start) < end,
    )
    if query.device_id:
        stmt = stmt.where(col(DeviceRollup.device_id) == query.device_id)
    if query.model is not None:
        stmt = stmt.where(col(table.model) == query.model)
    if query.version is not None:
        stmt = stmt.where(col(table.version) == query.version)
    for (row,) in session.execute(stmt):
        into[floor_time(row.bucket_start, query.step_s)].add_rollup(row)


def _add_raw(
    session: Session,
    query: SeriesQuery,
    start: datetime,
    end: datetime,
    into: Any,
    received_since: datetime | None = None,
) -> None:
    if session.get_bind().dialect.name == "postgresql":
        filters = {"model": query.model, "version": query.version, "device_id": query.device_id}
        for bucket, _, agg in grouped_windows_pg(
            session, start, end, query.step_s, by="bucket", received_since=received_since, **filters
        ):
            into[bucket].merge(agg)
        return
    columns = [getattr(TelemetryRecord, name) for name in RAW_COLUMNS]
    stmt = sa.select(*columns).where(col(TelemetryRecord.window_end) >= start, col(TelemetryRecord.window_end) < end)
    if received_since is not None:
        stmt = stmt.where(col(TelemetryRecord.received_at) >= received_since)
    if query.device_id:
        stmt = stmt.where(col(TelemetryRecord.device_id) == query.device_id)
    if query.model is not None:
        stmt = stmt.where(col(TelemetryRecord.model) == query.model)
    if query.version is not None:
        stmt = stmt.where(col(TelemetryRecord.version) == query.version)
    for row in session.execute(stmt):
        into[floor_time(row.window_end, query.step_s)].add_window(row)


def series(session: Session, query: SeriesQuery) -> dict[str, Any]:
    """Points from `start` (floored to the step) to `end`; steps without telemetry have null values."""
    buckets = query.buckets()
    first, end = buckets[0], buckets[-1] + timedelta(seconds=query.step_s)
    aggregates: dict[datetime, Aggregate] = defaultdict(Aggregate)
    resolution = resolution_for(query.step_s, query.device_id)
    watermark = rollup_watermark(session)
    if resolution is None or watermark is None:
        _add_raw(session, query, first, end, aggregates)
        sources = ["raw"]
    else:
        # Rollups hold every window received before the job's watermark; the raw rows received
        # since are exactly the rest, so nothing is counted twice or missed.
        _add_rollups(session, query, resolution, first, end, aggregates)
        _add_raw(session, query, first, end, aggregates, received_since=watermark)
        sources = [f"rollup_{resolution}s", "raw"]
    return {
        "model": query.model,
        "version": query.version,
        "device_id": query.device_id,
        "step_s": query.step_s,
        "start": first,
        "end": end,
        "sources": sources,
        "points": [{"t": b, **aggregates.get(b, Aggregate()).point()} for b in buckets],
    }
