"""Rollups from real ingested windows: exact merged percentiles, idempotent re-runs, retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session, func, select

from control_plane.models import TelemetryRecord
from control_plane.telemetry.aggregate import Aggregate
from control_plane.telemetry.rollup import HOUR, MINUTE, TEN_SECONDS, RetentionPolicy, run_rollup
from control_plane.telemetry.tables import DeviceRollup, VersionRollup
from tests.support.telemetry import T0, add_devices, ingest, window

DAY = 86400
KEEP_ALL = RetentionPolicy(raw_s=30 * DAY, minute_s=60 * DAY, hour_s=400 * DAY)
NOW = T0 + timedelta(hours=2)


@pytest.fixture
def db(app, engine: sa.Engine) -> sa.Engine:  # type: ignore[no-untyped-def]
    return engine  # `app` empties every table after the test


def _rows(engine: sa.Engine, table: type, resolution_s: int) -> list:  # type: ignore[type-arg]
    with Session(engine) as session:
        stmt = select(table).where(table.resolution_s == resolution_s).order_by(table.bucket_start)
        return list(session.exec(stmt).all())


def _rollup(engine: sa.Engine, policy: RetentionPolicy = KEEP_ALL, now=NOW):  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return run_rollup(session, policy, now=now)


def _two_devices_two_minutes(engine: sa.Engine) -> list[str]:
    a, b = add_devices(engine, "dev-a", "dev-b")
    ingest(
        engine,
        [
            # minute 10:00: a has 10 requests in (40, 80] ms, b 10 in (160, 320] ms, 2 errors
            window(a, T0 + timedelta(seconds=10), {3: 10}, ttft_s=0.02, tokens_per_s=30.0, rss_mb=100),
            window(b, T0 + timedelta(seconds=20), {5: 10}, errors=2, ttft_s=0.06, tokens_per_s=10.0, rss_mb=300),
            # minute 10:01: a again, 5 requests in (80, 160] ms
            window(a, T0 + timedelta(seconds=70), {4: 5}, rss_mb=120),
        ],
    )
    return [a, b]


def test_minute_and_hour_rows_merge_histograms_exactly(db: sa.Engine) -> None:
    a, b = _two_devices_two_minutes(db)
    report = _rollup(db)
    assert (report.minute_buckets, report.hour_buckets) == (2, 1)

    minutes = _rows(db, VersionRollup, MINUTE)
    assert [(r.bucket_start.replace(tzinfo=None), r.requests, r.errors, r.windows) for r in minutes] == [
        (T0.replace(tzinfo=None), 20, 2, 2),
        ((T0 + timedelta(minutes=1)).replace(tzinfo=None), 5, 0, 1),
    ]
    first = minutes[0]
    assert first.latency_histogram["counts"][3:6] == [10, 0, 10]
    assert first.max_rss_bytes == 300 * 2**20
    agg = Aggregate()
    agg.add_rollup(first)
    point = agg.point()
    # rank 10 of 20 ends bucket (0.04, 0.08]; rank 19 is 9/10 into (0.16, 0.32]; rank 19.8 is 98% into it
    assert point["latency_p50_ms"] == pytest.approx(80.0)
    assert point["latency_p95_ms"] == pytest.approx(304.0)
    assert point["latency_p99_ms"] == pytest.approx(316.8)
    assert point["error_rate"] == pytest.approx(0.1)
    assert point["ttft_ms"] == pytest.approx(40.0)  # request-weighted mean of 20 ms and 60 ms
    assert point["tokens_per_s"] == pytest.approx(20.0)
    assert point["rss_bytes"] == 200 * 2**20

    per_device = {(r.device_id, r.bucket_start.minute): r.requests for r in _rows(db, DeviceRollup, MINUTE)}
    assert per_device == {(a, 0): 10, (b, 0): 10, (a, 1): 5}

    (hour,) = _rows(db, VersionRollup, HOUR)
    assert (hour.requests, hour.errors, hour.windows) == (25, 2, 3)
    assert hour.latency_histogram["counts"][3:6] == [10, 5, 10]
    device_hours = {r.device_id: r.requests for r in _rows(db, DeviceRollup, HOUR)}
    assert device_hours == {a: 15, b: 10}

    # 10-second rows, per version only: each window in the bucket its window_end falls in.
    tens = _rows(db, VersionRollup, TEN_SECONDS)
    start = T0.replace(tzinfo=None)
    assert [((r.bucket_start.replace(tzinfo=None) - start).seconds, r.requests, r.errors) for r in tens] == [
        (10, 10, 0),
        (20, 10, 2),
        (70, 5, 0),
    ]
    assert tens[1].latency_histogram["counts"][5] == 10
    assert _rows(db, DeviceRollup, TEN_SECONDS) == []


def test_rerunning_does_not_double_count_and_late_windows_are_added(db: sa.Engine) -> None:
    a, _ = _two_devices_two_minutes(db)
    _rollup(db)
    again = _rollup(db)  # nothing new arrived, but the settle margin re-reads the same rows
    assert again.minute_buckets == 2
    assert [r.requests for r in _rows(db, VersionRollup, MINUTE)] == [20, 5]
    assert _rows(db, VersionRollup, HOUR)[0].requests == 25

    ingest(db, [window(a, T0 + timedelta(seconds=30), {3: 7})])  # late arrival for minute 10:00
    _rollup(db)
    assert [r.requests for r in _rows(db, VersionRollup, MINUTE)] == [27, 5]
    assert _rows(db, VersionRollup, HOUR)[0].requests == 32
    assert len(_rows(db, DeviceRollup, MINUTE)) == 3


def test_retention_deletes_raw_rows_but_keeps_rollups(db: sa.Engine) -> None:
    _two_devices_two_minutes(db)
    policy = RetentionPolicy(raw_s=3600, minute_s=3 * 3600, hour_s=400 * DAY)
    _rollup(db, policy, now=T0 + timedelta(minutes=30))
    with Session(db) as session:
        assert session.exec(select(func.count()).select_from(TelemetryRecord)).one() == 3

    report = _rollup(db, policy, now=T0 + timedelta(hours=1, seconds=65))  # 10:00 raw rows expired
    assert report.raw_deleted == 2
    with Session(db) as session:
        assert session.exec(select(func.count()).select_from(TelemetryRecord)).one() == 1
    assert [r.requests for r in _rows(db, VersionRollup, MINUTE)] == [20, 5]  # not recomputed from a fragment
    assert [r.requests for r in _rows(db, VersionRollup, TEN_SECONDS)] == [5]  # kept as long as raw rows

    _rollup(db, policy, now=T0 + timedelta(hours=4))  # minute rollups expired too; hours stay
    assert _rows(db, VersionRollup, MINUTE) == []
    assert _rows(db, DeviceRollup, MINUTE) == []
    assert [r.requests for r in _rows(db, VersionRollup, HOUR)] == [25]


def test_a_late_window_for_an_expired_minute_does_not_count_twice_in_its_hour(db: sa.Engine) -> None:
    a, _ = _two_devices_two_minutes(db)
    policy = RetentionPolicy(raw_s=30 * DAY, minute_s=7200, hour_s=400 * DAY)
    later = T0 + timedelta(hours=3)
    _rollup(db, policy, now=T0 + timedelta(minutes=30))
    _rollup(db, policy, now=later)  # the minute rows expire; the hour stays
    assert _rows(db, VersionRollup, MINUTE) == []
    ingest(db, [window(a, T0 + timedelta(seconds=30), {3: 7})])
    _rollup(db, policy, now=later)
    assert [r.requests for r in _rows(db, VersionRollup, HOUR)] == [25]
