"""Per-minute, per-device aggregation of raw windows done inside PostgreSQL.

The same sums as `Aggregate.add_window`, with histogram counts summed position by position, grouped
by bucket layout: PostgreSQL does in C what Python would do per row, which keeps a rollup pass
cheap at fleet scale (docs/performance.md#telemetry-rollups-and-queries). SQLite uses the Python
path.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.telemetry.aggregate import Aggregate

Key = tuple[str, str, str]

MAX_BUCKETS = 32  # count columns summed; the OpenTelemetry layouts we use have at most 17
_COUNT_SUMS = ",\n       ".join(f"SUM((counts ->> {i})::bigint) AS c{i}" for i in range(MAX_BUCKETS))
# MATERIALIZED: each window's JSON is parsed once (to jsonb), not once per count column.
GROUPED = """
WITH w AS MATERIALIZED (
    SELECT device_id, COALESCE(model, '') AS model, COALESCE(version, '') AS version,
           timezone('UTC', to_timestamp(floor(extract(epoch FROM window_end) / :step) * :step)) AS bucket,
           requests, errors, latency_max_ms,
           ttft_p95_ms, tokens_per_s_p50, rss_bytes, peak_rss_bytes,
           (latency_histogram ->> 'bounds') AS bounds, (latency_histogram::jsonb -> 'counts') AS counts
    FROM telemetry_windows
    WHERE {where}
)
SELECT {keys}, bucket, bounds, COUNT(*) AS windows, SUM(requests) AS requests,
       SUM(errors) AS errors, MAX(latency_max_ms) AS latency_max_ms,
       COALESCE(SUM(ttft_p95_ms * requests) FILTER (WHERE ttft_p95_ms IS NOT NULL AND requests > 0), 0)
           AS ttft_ms_sum,
       COALESCE(SUM(requests) FILTER (WHERE ttft_p95_ms IS NOT NULL AND requests > 0), 0) AS ttft_requests,
       COALESCE(SUM(tokens_per_s_p50 * requests) FILTER (WHERE tokens_per_s_p50 IS NOT NULL AND requests > 0), 0)
           AS tokens_per_s_sum,
       COALESCE(SUM(requests) FILTER (WHERE tokens_per_s_p50 IS NOT NULL AND requests > 0), 0)
           AS tokens_per_s_requests,
       SUM(rss_bytes) AS rss_bytes_sum, MAX(GREATEST(peak_rss_bytes, rss_bytes)) AS max_rss_bytes,
       {count_sums}
FROM w GROUP BY {group}bucket, bounds
""".replace("{count_sums}", _COUNT_SUMS)
# Optional filters: fixed clauses, values always bound.
_FILTERS = {
    "received_before": "received_at < :received_before",
    "received_since": "received_at >= :received_since",
    "model": "model = :model",
    "version": "version = :version",
    "device_id": "device_id = :device_id",
}
_SCALAR_FIELDS = (
    "windows",
    "requests",
    "errors",
    "ttft_requests",
    "tokens_per_s_requests",
    "rss_bytes_sum",
    "max_rss_bytes",
)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)  # timezone('UTC', ...) hands back naive UTC


def _aggregate(row: sa.Row) -> Aggregate:  # type: ignore[type-arg]
    agg = Aggregate()
    for name in _SCALAR_FIELDS:
        setattr(agg, name, int(getattr(row, name) or 0))
    agg.ttft_ms_sum = float(row.ttft_ms_sum)
    agg.tokens_per_s_sum = float(row.tokens_per_s_sum)
    agg.latency_max_ms = None if row.latency_max_ms is None else float(row.latency_max_ms)
    if row.bounds:
        bounds = json.loads(row.bounds)
        counts = [int(getattr(row, f"c{i}") or 0) for i in range(min(len(bounds) + 1, MAX_BUCKETS))]
        agg.add_histogram({"bounds": bounds, "counts": counts})
    return agg


_GROUPINGS = {
    "device": ("device_id, model, version", "device_id, model, version, "),
    "version": ("'' AS device_id, model, version", "model, version, "),
    # one row per bucket: what a series needs, and far fewer rows to hand to Python
    "bucket": ("'' AS device_id, '' AS model, '' AS version", ""),
}


def grouped_windows_pg(
    session: Session, start: datetime, end: datetime, step_s: int, by: str = "device", **filters: Any
) -> Iterator[tuple[datetime, Key, Aggregate]]:
    """(bucket, (model, version, device), aggregate) of the windows ending in [start, end), grouped
    `by` device (and version), by version only (device ""), or by bucket only (all keys "")."""
    given = {name: value for name, value in filters.items() if value is not None}
    where = ["window_end >= :start", "window_end < :end", *(_FILTERS[name] for name in given)]
    keys, group = _GROUPINGS[by]
    sql = GROUPED.replace("{where}", " AND ".join(where)).replace("{keys}", keys).replace("{group}", group)
    for row in session.execute(sa.text(sql), {"start": start, "end": end, "step": step_s, **given}):
        yield _utc(row.bucket), (row.model, row.version, row.device_id), _aggregate(row)


def group_raw_pg(
    session: Session, start: datetime, end: datetime, before: datetime
) -> dict[tuple[datetime, Key], Aggregate]:
    """Per (minute, key) aggregates of the windows in [start, end) received before `before`,
    per device and per version (device "")."""
    groups: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for bucket, (model, version, device), agg in grouped_windows_pg(session, start, end, 60, received_before=before):
        # A device key sees one row per histogram layout (almost always one); merging adds them.
        groups[(bucket, (model, version, device))].merge(agg)
        groups[(bucket, (model, version, ""))].merge(agg)
    return dict(groups)


def group_versions_pg(
    session: Session, start: datetime, end: datetime, step_s: int, before: datetime
) -> dict[tuple[datetime, Key], Aggregate]:
    """Per (bucket of `step_s`, version) aggregates of the windows in [start, end) received before `before`."""
    groups: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for bucket, key, agg in grouped_windows_pg(session, start, end, step_s, by="version", received_before=before):
        groups[(bucket, key)].merge(agg)
    return dict(groups)
