"""Roll raw telemetry windows up into per-minute and per-hour rows, then apply retention.

run_rollup(session, policy)
  -> minute buckets touched by raw rows that arrived since the watermark (minus a settle margin)
  -> each touched minute is recomputed from all its raw rows: delete its rollup rows, insert anew
     (per device and per version), and its six 10-second rows per version (live charts with
     sub-minute steps read those instead of every raw window of the fleet)
  -> each touched hour gets the difference between the new and the old minute rows added
  -> raw rows, minute rows and hour rows past their retention are deleted; on PostgreSQL raw
     rows go a whole day at a time, by dropping the day's partition (telemetry/partitions.py),
     which the job creates ahead of time (first thing in a pass, committed on its own)

Recomputing whole minutes (never adding into them) makes a run idempotent: re-running over the
same windows changes no minute, so the hours get a zero difference and nothing is double counted.
Hours are updated by difference rather than recomputed so a pass costs what arrived, not the size
of the hour (10,000 devices write 600,000 device-minute rows an hour). A window is in the bucket
of its `window_end`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from control_plane.models import TelemetryRecord, as_utc, utcnow
from control_plane.telemetry import partitions
from control_plane.telemetry.aggregate import RAW_COLUMNS, Aggregate
from control_plane.telemetry.pg_group import group_raw_pg, group_versions_pg
from control_plane.telemetry.tables import DeviceRollup, RollupState, VersionRollup

log = logging.getLogger("slmops.telemetry")
TEN_SECONDS, MINUTE, HOUR = 10, 60, 3600
# Ingest stamps received_at before its batch commits (well under a second); rows committed up to
# this long after their stamp are still found by the next run.
SETTLE = timedelta(seconds=15)
MAX_RUN_MINUTES = 60  # raw rows of at most this many minutes are held in memory at once
STATE_NAME = "rollup"
Key = tuple[str, str, str]  # (model, version, device_id); device "" for the per-version row


@dataclass(frozen=True)
class RetentionPolicy:
    raw_s: int
    minute_s: int
    hour_s: int

    @classmethod
    def from_settings(cls, settings: Any) -> RetentionPolicy:
        return cls(
            raw_s=settings.telemetry_retention_s,
            minute_s=settings.telemetry_minute_retention_s,
            hour_s=settings.telemetry_hour_retention_s,
        )


@dataclass
class RollupReport:
    minute_buckets: int = 0
    hour_buckets: int = 0
    raw_deleted: int = 0
    rollups_deleted: int = 0
    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)


def floor_time(value: datetime, step_s: int) -> datetime:
    utc = as_utc(value)
    assert utc is not None
    seconds = int(utc.timestamp())
    return datetime.fromtimestamp(seconds - seconds % step_s, UTC)


def _minute_expr(dialect: str) -> Any:
    column = col(TelemetryRecord.window_end)
    if dialect == "postgresql":
        return sa.func.date_trunc("minute", sa.func.timezone("UTC", column))
    return sa.func.strftime("%Y-%m-%d %H:%M:00", column)


def _touched_minutes(session: Session, since: datetime | None) -> list[datetime]:
    expr = _minute_expr(session.get_bind().dialect.name)
    stmt = sa.select(expr).distinct()
    if since is not None:
        stmt = stmt.where(col(TelemetryRecord.received_at) >= since)
    found: set[datetime] = set()
    for (value,) in session.execute(stmt):
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        found.add(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    return sorted(found)


def _runs(minutes: list[datetime]) -> Iterable[tuple[datetime, datetime]]:
    """Contiguous minutes as [start, end) ranges, so a backlog is read in a few range scans."""
    start = prev = None
    for minute in minutes:
        if start is not None and prev is not None:
            contiguous = minute - prev == timedelta(seconds=MINUTE)
            if contiguous and minute - start < timedelta(seconds=MINUTE * MAX_RUN_MINUTES):
                prev = minute
                continue
            yield start, prev + timedelta(seconds=MINUTE)
        start = prev = minute
    if start is not None and prev is not None:
        yield start, prev + timedelta(seconds=MINUTE)


def _raw_rows(session: Session, start: datetime, end: datetime, received_before: datetime) -> Any:
    columns = [getattr(TelemetryRecord, name) for name in RAW_COLUMNS]
    return session.execute(
        sa.select(*columns).where(
            col(TelemetryRecord.window_end) >= start,
            col(TelemetryRecord.window_end) < end,
            # Later rows wait for the next pass, so a query can add exactly `received_at >= watermark`.
            col(TelemetryRecord.received_at) < received_before,
        )
    )


def _group_raw(
    session: Session, start: datetime, end: datetime, received_before: datetime
) -> dict[tuple[datetime, Key], Aggregate]:
    if session.get_bind().dialect.name == "postgresql":
        return group_raw_pg(session, start, end, received_before)
    groups: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for row in _raw_rows(session, start, end, received_before):
        bucket = floor_time(row.window_end, MINUTE)
        model, version = row.model or "", row.version or ""
        groups[(bucket, (model, version, row.device_id))].add_window(row)
        groups[(bucket, (model, version, ""))].add_window(row)
    return groups


def _group_versions(
    session: Session, start: datetime, end: datetime, received_before: datetime
) -> dict[tuple[datetime, Key], Aggregate]:
    """Per (10-second bucket, version) aggregates, device "" (the per-version rows only)."""
    if session.get_bind().dialect.name == "postgresql":
        return group_versions_pg(session, start, end, TEN_SECONDS, received_before)
    groups: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for row in _raw_rows(session, start, end, received_before):
        groups[(floor_time(row.window_end, TEN_SECONDS), (row.model or "", row.version or "", ""))].add_window(row)
    return groups


def _load(session: Session, resolution_s: int, start: datetime, end: datetime) -> dict[tuple[datetime, Key], Aggregate]:
    """Stored rollup rows of one resolution in [start, end), as aggregates."""
    groups: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for table in (DeviceRollup, VersionRollup):
        rows = session.execute(
            sa.select(*table.__table__.c).where(  # type: ignore[union-attr]
                col(table.resolution_s) == resolution_s,
                col(table.bucket_start) >= start,
                col(table.bucket_start) < end,
            )
        )
        for row in rows:
            device = getattr(row, "device_id", "")
            groups[(floor_time(row.bucket_start, resolution_s), (row.model, row.version, device))].add_rollup(row)
    return groups


def _roll_minutes(session: Session, start: datetime, end: datetime, watermark: datetime, hour_deltas: Any) -> None:
    """Recompute the minutes of [start, end) from raw rows; note how each changed for the hours."""
    old = _load(session, MINUTE, start, end)
    new = _group_raw(session, start, end, watermark)
    _replace(session, MINUTE, start, end, new)
    _replace(session, TEN_SECONDS, start, end, _group_versions(session, start, end, watermark))
    for (bucket, key), agg in new.items():
        hour_deltas[(floor_time(bucket, HOUR), key)].merge(agg)
    for (bucket, key), agg in old.items():
        hour_deltas[(floor_time(bucket, HOUR), key)].merge(agg, -1)


def _roll_hour(session: Session, hour: datetime, hour_deltas: dict[tuple[datetime, Key], Aggregate]) -> None:
    """Add the minutes' changes into the stored hour: exact, and costs what changed, not the hour."""
    end = hour + timedelta(seconds=HOUR)
    rows = _load(session, HOUR, hour, end)
    for (bucket, key), delta in hour_deltas.items():
        if bucket == hour:
            rows[(bucket, key)].merge(delta)
    _replace(session, HOUR, hour, end, {k: agg for k, agg in rows.items() if agg.windows > 0})


def _replace(
    session: Session, resolution_s: int, start: datetime, end: datetime, groups: dict[tuple[datetime, Key], Aggregate]
) -> None:
    """Swap the rollup rows of [start, end) at one resolution for freshly computed ones."""
    now = utcnow()
    device_rows: list[dict[str, Any]] = []
    version_rows: list[dict[str, Any]] = []
    for (bucket, (model, version, device)), agg in groups.items():
        row = {"resolution_s": resolution_s, "model": model, "version": version, "bucket_start": bucket}
        row.update(agg.columns(), updated_at=now)
        (device_rows if device else version_rows).append({**row, "device_id": device} if device else row)
    for table, rows in ((DeviceRollup, device_rows), (VersionRollup, version_rows)):
        session.execute(
            sa.delete(table).where(
                col(table.resolution_s) == resolution_s,
                col(table.bucket_start) >= start,
                col(table.bucket_start) < end,
            )
        )
        if rows:
            session.execute(sa.insert(table), rows)


def _apply_retention(session: Session, policy: RetentionPolicy, now: datetime, report: RollupReport) -> None:
    raw_cutoff = now - timedelta(seconds=policy.raw_s)
    if partitions.is_partitioned(session):
        dropped = partitions.drop_expired(session, raw_cutoff)
        report.partitions_dropped, report.raw_deleted = dropped.partitions, dropped.default_rows
    else:
        result = session.execute(sa.delete(TelemetryRecord).where(col(TelemetryRecord.window_end) < raw_cutoff))
        report.raw_deleted = result.rowcount or 0  # type: ignore[attr-defined]
    for resolution_s, keep_s in ((TEN_SECONDS, policy.raw_s), (MINUTE, policy.minute_s), (HOUR, policy.hour_s)):
        cutoff = now - timedelta(seconds=keep_s)
        for table in (DeviceRollup, VersionRollup):
            result = session.execute(
                sa.delete(table).where(col(table.resolution_s) == resolution_s, col(table.bucket_start) < cutoff)
            )
            report.rollups_deleted += result.rowcount or 0  # type: ignore[attr-defined]


def run_rollup(session: Session, policy: RetentionPolicy, now: datetime | None = None) -> RollupReport:
    """One pass: roll up what arrived since the last pass, then delete what retention expires.

    `now` moves the retention cutoffs (tests); arrival is always judged by the real clock.
    """
    now = now or utcnow()
    scan_started = utcnow()
    # Its own short transaction: attaching a partition locks the default one until commit.
    created = partitions.ensure_days(session, scan_started.date())
    session.commit()
    state = session.get(RollupState, STATE_NAME) or RollupState(name=STATE_NAME)
    watermark = as_utc(state.watermark)
    since = watermark - SETTLE if watermark is not None else None
    # A minute whose older raw rows are gone would be recomputed from a fragment, and one whose
    # minute row is gone would be added to its hour a second time: leave both alone.
    kept_s = min(policy.raw_s, policy.minute_s)
    complete_from = floor_time(now - timedelta(seconds=kept_s), MINUTE) + timedelta(seconds=MINUTE)
    minutes = [m for m in _touched_minutes(session, since) if m >= complete_from]
    report = RollupReport(minute_buckets=len(minutes), partitions_created=created)
    hour_deltas: dict[tuple[datetime, Key], Aggregate] = defaultdict(Aggregate)
    for start, end in _runs(minutes):
        _roll_minutes(session, start, end, scan_started, hour_deltas)
    hours = sorted({bucket for bucket, _ in hour_deltas})
    report.hour_buckets = len(hours)
    for hour in hours:
        _roll_hour(session, hour, hour_deltas)
    _apply_retention(session, policy, now, report)
    state.watermark = scan_started
    session.add(state)
    session.commit()
    return report


def rollup_watermark(session: Session) -> datetime | None:
    state = session.get(RollupState, STATE_NAME)
    return as_utc(state.watermark) if state else None


class RollupJob:
    """A thread that runs `run_rollup` every `interval_s` while `may_run()` (the leader) says so."""

    def __init__(
        self,
        engine: sa.Engine,
        policy: RetentionPolicy,
        interval_s: float,
        may_run: Callable[[], bool] = lambda: True,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.interval_s = interval_s
        self.may_run = may_run
        self.last_report: RollupReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slmops-rollup", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.may_run():
                continue
            try:
                with Session(self.engine, expire_on_commit=False) as session:
                    self.last_report = run_rollup(session, self.policy)
            except Exception:  # a database blip must not end the job; the next pass recomputes
                log.exception("telemetry rollup failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
