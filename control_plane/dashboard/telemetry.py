"""Time series for the dashboard charts: p95 latency and RSS per model version, from telemetry windows.

p95 per time bucket comes from the windows' merged fixed-bucket histograms (the gates' method), so
devices and windows combine correctly; a window without a histogram falls back to its own p95,
weighted by its request count. RSS is the mean over the windows in the bucket.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from control_plane.models import TelemetryRecord, as_utc, utcnow
from control_plane.rollouts.gates import merged_percentile

MAX_ROWS = 50_000  # a chart of 60 points needs no more; bounds the cost on a large fleet
RANGES_S = {"5m": 300, "15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600}
POINTS = 60


@dataclass
class _Bucket:
    histograms: list[dict[str, Any]] = field(default_factory=list)
    weighted_p95: float = 0.0
    weight: int = 0
    rss_sum: float = 0.0
    windows: int = 0
    requests: int = 0

    def p95_ms(self) -> float | None:
        merged = merged_percentile(self.histograms, 0.95)
        if merged is not None:
            return merged * 1000
        return self.weighted_p95 / self.weight if self.weight else None


def step_for(span_s: float) -> int:
    return max(1, int(span_s // POINTS))


def version_series(
    session: Session, *, since: datetime, step_s: int, model: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{"p95_ms": [{"name": "m@v", "points": [[epoch_ms, value], ...]}], "rss_mb": [...], "requests": [...]}"""
    stmt = select(
        TelemetryRecord.window_end,
        TelemetryRecord.model,
        TelemetryRecord.version,
        TelemetryRecord.requests,
        TelemetryRecord.latency_p95_ms,
        TelemetryRecord.latency_histogram,
        TelemetryRecord.rss_bytes,
    ).where(TelemetryRecord.window_end >= since, col(TelemetryRecord.version).is_not(None))
    if model:
        stmt = stmt.where(TelemetryRecord.model == model)
    rows = session.exec(stmt.order_by(col(TelemetryRecord.window_end).desc()).limit(MAX_ROWS)).all()
    buckets: dict[str, dict[int, _Bucket]] = defaultdict(lambda: defaultdict(_Bucket))
    for end, row_model, version, requests, p95, histogram, rss in rows:
        stamp = as_utc(end) or since
        slot = int(stamp.timestamp() // step_s) * step_s
        bucket = buckets[f"{row_model}@{version}"][slot]
        if histogram and histogram.get("counts"):
            bucket.histograms.append(histogram)
        elif p95 is not None and requests:
            bucket.weighted_p95 += p95 * requests
            bucket.weight += requests
        bucket.rss_sum += rss / 2**20
        bucket.windows += 1
        bucket.requests += requests
    return {
        "p95_ms": _series(buckets, step_s, lambda b: b.p95_ms()),
        "rss_mb": _series(buckets, step_s, lambda b: b.rss_sum / b.windows if b.windows else None),
        "requests": _series(buckets, step_s, lambda b: float(b.requests)),
    }


def _series(buckets: dict[str, dict[int, _Bucket]], step_s: int, value: Any) -> list[dict[str, Any]]:
    out = []
    for name in sorted(buckets):
        points = []
        for slot in sorted(buckets[name]):
            v = value(buckets[name][slot])
            if v is not None:
                # Plot at the bucket's middle, in epoch milliseconds (what JS dates use).
                points.append([int((slot + step_s / 2) * 1000), round(float(v), 3)])
        out.append({"name": name, "points": points})
    return out


def since_for(range_key: str) -> tuple[datetime, int]:
    span = RANGES_S.get(range_key, RANGES_S["15m"])
    return utcnow() - timedelta(seconds=span), step_for(span)
