"""Telemetry queries over many raw windows on PostgreSQL: rollup time, then fleet-summary and
per-version percentile query latency (p50/p95 of repeated calls).

Rows are generated inside PostgreSQL (generate_series): `--devices` devices each sending one
10-second window, spread back from now, with the OpenTelemetry request-duration histogram.

    python benchmarks/telemetry_queries.py --rows 10000000 --devices 10000
    python benchmarks/telemetry_queries.py --rows 200000 --devices 1000 --url postgresql+psycopg://postgres@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane import db
from control_plane.models import utcnow
from control_plane.telemetry.rollup import RetentionPolicy, run_rollup
from control_plane.telemetry.series import SeriesQuery, series
from control_plane.telemetry.summary import fleet_summary
from shared.telemetry import REQUEST_DURATION_BUCKETS

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BOUNDS = "[" + ",".join(str(b) for b in REQUEST_DURATION_BUCKETS) + "]"
# Two versions: "1" around 40-80 ms, "2" a bucket slower; counts vary with the row number.
COUNTS = (
    "'[0,0,0,' || (g % 7 + 5) || ',' || (g % 5 + 10) || ',' || (CASE WHEN g % 2 = 0 THEN 0 ELSE 5 END) "
    "|| ',' || (g % 3) || ',0,0,0,0,0,0,0,0]'"
)
GENERATE = f"""
INSERT INTO telemetry_windows (id, device_id, message_id, seq, window_start, window_end, model, version,
    requests, errors, latency_p95_ms, ttft_p95_ms, tokens_per_s_p50, rss_bytes, peak_rss_bytes,
    latency_histogram, received_at)
SELECT md5('w' || g), 'dev-' || (g % :devices), md5('m' || g), g / :devices,
    :now - (((g - :lo) / :devices) * 10 + 10) * interval '1 second',
    :now - ((g - :lo) / :devices) * 10 * interval '1 second',
    'tiny', (CASE WHEN g % 2 = 0 THEN '1' ELSE '2' END), 20, g % 3, 80.0, 30.0, 25.0,
    (100 + g % 50) * 1048576, (120 + g % 50) * 1048576,
    ('{{"bounds": {BOUNDS}, "counts": ' || {COUNTS} || '}}')::json,
    COALESCE(CAST(:received AS timestamptz), :now - ((g - :lo) / :devices) * 10 * interval '1 second')
FROM generate_series(:lo, :hi) AS g
"""
DEVICES = """
INSERT INTO devices (id, name, status, labels, hardware, created_by, created_at, current_model, current_version,
    current_sha256)
SELECT 'dev-' || g, 'device-' || g, (CASE WHEN g % 10 = 0 THEN 'offline' ELSE 'online' END), '{}', '{}', 'bench',
    now(), 'tiny', (CASE WHEN g % 2 = 0 THEN '1' ELSE '2' END), md5(g::text)
FROM generate_series(0, :n - 1) AS g
"""


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.95) - 1)]


def windows(
    engine: sa.Engine, lo: int, hi: int, devices: int, newest: datetime, received: datetime | None = None
) -> None:
    """Rows lo..hi-1, the first `devices` of them ending at `newest`, each next round 10 s earlier;
    received when they ended unless `received` is given."""
    params = {"devices": devices, "now": newest, "lo": lo, "hi": hi - 1, "received": received}
    with engine.begin() as conn:
        conn.execute(sa.text(GENERATE), params)


def populate(engine: sa.Engine, rows: int, devices: int) -> float:
    started = time.perf_counter()
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.text(DEVICES), {"n": devices})
    chunk = (1_000_000 // devices) * devices  # whole rounds, so every chunk continues the timeline
    for lo in range(0, rows, chunk):
        windows(engine, lo, min(rows, lo + chunk), devices, now - timedelta(seconds=lo // devices * 10))
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return time.perf_counter() - started


def run(url: str, rows: int, devices: int, repeat: int) -> None:
    engine = db.make_engine(url)
    print(f"populating {rows:,} windows from {devices:,} devices ...", flush=True)
    print(f"populate: {populate(engine, rows, devices):.1f} s", flush=True)
    policy = RetentionPolicy(raw_s=30 * 86400, minute_s=60 * 86400, hour_s=400 * 86400)
    started = time.perf_counter()
    with Session(engine) as session:
        report = run_rollup(session, policy)
    elapsed = time.perf_counter() - started
    print(f"first rollup: {elapsed:.1f} s ({rows / elapsed:,.0f} windows/s, {report.minute_buckets} minutes)")
    # A live pass: every device has sent three more windows (30 s of a 10 s cadence) since.
    windows(engine, rows, rows + 3 * devices, devices, utcnow())
    with Session(engine) as session:
        started = time.perf_counter()
        live = run_rollup(session, policy)
        elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"live rollup pass (30 s of new windows, {live.minute_buckets} minutes recomputed): {elapsed_ms:.0f} ms")
    # Queries run as they would mid-interval: 30 s of windows arrived since the job's last pass.
    windows(engine, rows + 3 * devices, rows + 6 * devices, devices, utcnow(), received=utcnow())
    span = timedelta(seconds=rows // devices * 10)
    end = utcnow()
    queries: dict[str, Callable[[Session], Any]] = {
        "fleet summary": lambda s: fleet_summary(s, limit=100),
        "version p50/p95/p99, whole span, 5m step": lambda s: series(
            s, SeriesQuery(start=end - span, end=end, step_s=300, model="tiny", version="1")
        ),
        "version p50/p95/p99, whole span, 1h step": lambda s: series(
            s, SeriesQuery(start=end - span, end=end, step_s=3600, model="tiny", version="1")
        ),
        "device history, whole span, 1m step": lambda s: series(
            s, SeriesQuery(start=end - span, end=end, step_s=60, device_id="dev-1")
        ),
    }
    print(f"{'query':48} {'p50 ms':>8} {'p95 ms':>8}  (target p95 < 100 ms)")
    with Session(engine) as session:
        for name, query in queries.items():
            p50, p95 = timed(lambda q=query: q(session), repeat)  # type: ignore[misc]
            print(f"{name:48} {p50:8.1f} {p95:8.1f}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--url", help="an empty PostgreSQL database (default: a fresh one, dropped after)")
    args = parser.parse_args()
    if args.url:
        db.upgrade(args.url)
        run(args.url, args.rows, args.devices, args.repeat)
        return
    name = f"slmops_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        db.upgrade(url)
        run(url, args.rows, args.devices, args.repeat)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
