"""Chart data: p95 latency, RSS and requests per model version over time, one series per version.

Each series comes from `control_plane.telemetry.series` (what `/v1/telemetry/versions` serves):
merged fixed-bucket histograms, minute or hour rollups when the step allows and raw windows for
the newest buckets, so the charts and the REST API always agree and survive raw-window retention.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from control_plane.models import TelemetryRecord, as_utc, utcnow
from control_plane.telemetry.rollup import MINUTE, floor_time, rollup_watermark
from control_plane.telemetry.series import SeriesQuery, series
from control_plane.telemetry.tables import VersionRollup

RANGES_S = {"5m": 300, "15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600}
POINTS = 60
MAX_VERSIONS = 8  # one colour each; more lines than this are unreadable anyway
RAW_BUDGET = 20_000  # raw windows one chart request may aggregate; above it, rollups only


def step_for(span_s: float) -> int:
    """About POINTS points; from a quarter hour up, whole minutes, so the minute rollups answer
    and only the newest minutes (past the rollup watermark) are read from raw windows."""
    step = max(1, int(span_s // POINTS))
    return -(-step // MINUTE) * MINUTE if span_s >= 900 else step


def since_for(range_key: str) -> tuple[datetime, int]:
    span = RANGES_S.get(range_key, RANGES_S["15m"])
    return utcnow() - timedelta(seconds=span), step_for(span)


def _versions(session: Session, since: datetime, model: str | None, raw: bool) -> list[tuple[str, str]]:
    """(model, version) pairs with telemetry since `since`, in rollups and (when `raw`) raw windows."""
    rolled = sa.select(col(VersionRollup.model), col(VersionRollup.version)).where(
        col(VersionRollup.bucket_start) >= since, col(VersionRollup.model) != ""
    )
    if model:
        rolled = rolled.where(col(VersionRollup.model) == model)
    pairs = {(m, v) for m, v in session.execute(rolled.distinct())}
    if raw:
        windows = sa.select(col(TelemetryRecord.model), col(TelemetryRecord.version)).where(
            col(TelemetryRecord.window_end) >= since,
            col(TelemetryRecord.model).is_not(None),
            col(TelemetryRecord.version).is_not(None),
        )
        if model:
            windows = windows.where(col(TelemetryRecord.model) == model)
        pairs |= {(m, v) for m, v in session.execute(windows.distinct())}
    return sorted(pairs)[:MAX_VERSIONS]


def _many_raw_windows(session: Session, since: datetime, budget: int) -> bool:
    # Reads at most budget + 1 index entries, so asking costs little however large the fleet.
    probe = sa.select(col(TelemetryRecord.id)).where(col(TelemetryRecord.window_end) >= since).limit(budget + 1)
    return int(session.execute(sa.select(sa.func.count()).select_from(probe.subquery())).scalar_one()) > budget


def plan_range(
    session: Session, since: datetime, step_s: int, *, raw_budget: int = RAW_BUDGET
) -> tuple[int, datetime, bool]:
    """(step, end, read raw windows?). A small fleet gets fine steps from raw windows up to now; a
    large one whole minutes from the rollups only, ending at the rollup job's watermark (one job
    interval behind at most), so a chart refresh never aggregates hundreds of thousands of windows."""
    now = utcnow()
    if not _many_raw_windows(session, since, raw_budget):
        return step_s, now, True
    minutes = -(-step_s // MINUTE) * MINUTE
    watermark = rollup_watermark(session)
    if watermark is None:  # the rollup job has not run yet: raw windows are all there is
        return minutes, now, True
    return minutes, max(floor_time(watermark, minutes), since + timedelta(seconds=minutes)), False


def version_series(
    session: Session, *, since: datetime, step_s: int, model: str | None = None, raw_budget: int = RAW_BUDGET
) -> dict[str, Any]:
    """{"step_s": n, "p95_ms"|"rss_mb"|"requests": [{"name": "m@v", "points": [[epoch_ms, value], ...]}]}"""
    step_s, end, raw = plan_range(session, since, step_s, raw_budget=raw_budget)
    out: dict[str, Any] = {"step_s": step_s, "p95_ms": [], "rss_mb": [], "requests": []}
    for model_name, version in _versions(session, since, model, raw):
        query = SeriesQuery(start=since, end=end, step_s=step_s, model=model_name, version=version)
        points = series(session, query)["points"]
        name = f"{model_name}@{version}"
        out["p95_ms"].append({"name": name, "points": _points(points, "latency_p95_ms", step_s)})
        out["rss_mb"].append({"name": name, "points": _points(points, "rss_bytes", step_s, scale=1 / 2**20)})
        out["requests"].append({"name": name, "points": _points(points, "requests", step_s, skip_zero=True)})
    return out


def _points(
    points: list[dict[str, Any]], key: str, step_s: int, scale: float = 1.0, skip_zero: bool = False
) -> list[list[float]]:
    out = []
    for point in points:
        value = point.get(key)
        if value is None or (skip_zero and not point.get("windows")):
            continue  # a step without telemetry is a gap, not a zero
        stamp = as_utc(point["t"]) or utcnow()
        # Plotted at the step's middle, in epoch milliseconds (what JS dates use).
        out.append([int((stamp.timestamp() + step_s / 2) * 1000), round(float(value) * scale, 3)])
    return out
