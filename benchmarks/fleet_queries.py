"""Fleet-summary and per-version percentile queries over millions of telemetry windows (PostgreSQL).

A fresh database gets N devices and `--rows` raw windows (one per device every `--interval-s`,
ending now, three versions with different latency histograms), generated inside PostgreSQL by one
INSERT ... SELECT per slice of devices (faster than COPY from Python: no row crosses the wire).
Then the rollup job the control plane's leader runs every 30 s (control_plane.telemetry.rollup)
catches up once, timed, and the /v1/telemetry endpoints are timed through the ASGI app in process
(no network), each repeated; p50 and p95 are printed next to the target (p95 < 100 ms).

    .venv/bin/python benchmarks/fleet_queries.py --rows 10000000 --devices 10000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet_support import fresh_postgres  # noqa: E402
from control_plane import db  # noqa: E402
from control_plane.api.main import create_app  # noqa: E402
from control_plane.config import Settings  # noqa: E402
from control_plane.models import Role  # noqa: E402
from control_plane.services import auth  # noqa: E402
from control_plane.telemetry.rollup import RetentionPolicy, run_rollup  # noqa: E402

BOUNDS = "0.01,0.02,0.04,0.08,0.16,0.32,0.64,1.28,2.56,5.12,10.24,20.48,40.96,81.92"
DEVICES_SQL = """
INSERT INTO devices (id, name, status, labels, hardware, last_seen, current_model, current_version, phase,
                     created_by, created_at)
SELECT 'dev-' || lpad(d::text, 6, '0'), 'sim-' || lpad(d::text, 6, '0'),
       CASE WHEN d % 50 = 0 THEN 'offline' ELSE 'online' END, '{}'::json,
       '{"cpu_model": "sim", "cpu_cores": 4, "ram_mb": 4096, "arch": "x86_64"}'::json, now(), 'bench',
       CASE WHEN d % 10 < 6 THEN '1' WHEN d % 10 < 9 THEN '2' ELSE '3' END, 'committed', 'bench', now()
FROM generate_series(0, CAST(:n AS int) - 1) d
"""
# Latency around 40 ms (v1), 60 ms (v2) and 150 ms (v3): most requests in one bucket, some next door.
WINDOWS_SQL = f"""
INSERT INTO telemetry_windows (id, device_id, message_id, seq, window_start, window_end, model, version,
    requests, errors, latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_max_ms, ttft_p95_ms,
    tokens_per_s_p50, rss_bytes, peak_rss_bytes, latency_histogram, received_at)
SELECT md5(d::text || '/' || k::text), 'dev-' || lpad(d::text, 6, '0'), md5(k::text || '/' || d::text), k,
       t - make_interval(secs => CAST(:interval AS int)), t, 'bench', v, 20, (k % 97 = 0)::int,
       b * 800, b * 1300, b * 1500, b * 1600, b * 400, 30 - b * 20, 125829120, 130023424,
       json_build_object('bounds', '[{BOUNDS}]'::json, 'counts',
           CASE v WHEN '1' THEN json_build_array(0,0,(k % 4),20 - (k % 4) - (k % 2),(k % 2),0,0,0,0,0,0,0,0,0,0)
                  WHEN '2' THEN json_build_array(0,0,0,18 - (k % 3),2 + (k % 3),0,0,0,0,0,0,0,0,0,0)
                  ELSE json_build_array(0,0,0,0,17 - (k % 5),3 + (k % 5),0,0,0,0,0,0,0,0,0) END),
       t + interval '50 milliseconds'
FROM generate_series(CAST(:first AS int), CAST(:last AS int)) d
CROSS JOIN generate_series(0, CAST(:windows AS int) - 1) k
CROSS JOIN LATERAL (SELECT CASE WHEN d % 10 < 6 THEN '1' WHEN d % 10 < 9 THEN '2' ELSE '3' END AS v,
                           CAST(:end_at AS timestamptz)
                               - make_interval(secs => (CAST(:windows AS int) - 1 - k) * CAST(:interval AS int)
                                                      + (d % CAST(:interval AS int))) AS t) x
CROSS JOIN LATERAL (SELECT CASE x.v WHEN '1' THEN 0.05 WHEN '2' THEN 0.075 ELSE 0.19 END AS b) y
"""


def load(engine: sa.Engine, devices: int, rows: int, interval_s: int, end_at: datetime) -> float:
    windows = rows // devices
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(DEVICES_SQL), {"n": devices})
    step = max(1, devices // 10)
    for first in range(0, devices, step):
        last = min(devices, first + step) - 1
        with engine.begin() as conn:
            params = {"first": first, "last": last, "windows": windows, "interval": interval_s, "end_at": end_at}
            conn.execute(sa.text(WINDOWS_SQL), params)
        done = (last + 1) * windows
        print(f"  {done:>10,} windows loaded, {time.perf_counter() - start:6.1f} s", flush=True)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return time.perf_counter() - start


def timed(client: TestClient, path: str, params: dict[str, str], headers: dict[str, str], repeat: int) -> list[float]:
    client.get(path, params=params, headers=headers).raise_for_status()  # warm: plans and caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(path, params=params, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return times


def queries(end_at: datetime, span: timedelta) -> list[tuple[str, str, dict[str, str]]]:
    def window(length: timedelta, step: str, version: str = "1") -> dict[str, str]:
        begin = end_at - length
        return {"model": "bench", "version": version, "start": begin.isoformat(), "end": end_at.isoformat(),
                "step": step}  # fmt: skip

    return [
        ("fleet summary", "/v1/telemetry/summary", {}),
        (f"v1 p50/p95/p99, whole {span}, step 1h", "/v1/telemetry/versions", window(span, "1h")),
        ("v3 p50/p95/p99, last 24 h, step 1h", "/v1/telemetry/versions", window(timedelta(hours=24), "1h", "3")),
        ("v1 p50/p95/p99, last hour, step 1m", "/v1/telemetry/versions", window(timedelta(hours=1), "1m")),
        ("v2 p50/p95/p99, last 10 min, step 30s (10 s rollups)", "/v1/telemetry/versions",
         window(timedelta(minutes=10), "30s", "2")),
        ("one device, whole range, step 5m", "/v1/telemetry/devices/dev-000007",
         {"start": (end_at - span).isoformat(), "end": end_at.isoformat(), "step": "5m"}),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--interval-s", type=int, default=10, help="seconds between a device's windows")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-rollup", action="store_true", help="query before the rollup job has run (raw rows)")
    args = parser.parse_args()
    end_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    span = timedelta(seconds=args.interval_s * (args.rows // args.devices))
    with fresh_postgres() as url, tempfile.TemporaryDirectory() as tmp:
        db.upgrade(url)
        engine = db.make_engine(url)
        print(f"loading {args.rows:,} windows of {args.devices:,} devices over {span} ...", flush=True)
        load_s = load(engine, args.devices, args.rows, args.interval_s, end_at)
        settings = Settings(data_dir=Path(tmp), database_url=url, fleet_enabled=False)
        rollup_s = None
        if not args.no_rollup:
            start = time.perf_counter()
            with Session(engine) as session:
                report = run_rollup(session, RetentionPolicy.from_settings(settings))
            rollup_s = time.perf_counter() - start
            print(f"rollup job caught up in {rollup_s:.1f} s: {report}", flush=True)
        with Session(engine) as session:
            _, token = auth.create_token(session, name="bench", role=Role.viewer)
            session.commit()
        headers = {"Authorization": f"Bearer {token}"}
        with TestClient(create_app(settings, engine=engine)) as client:
            results = [
                # Without rollups (--no-rollup) a query takes seconds at this scale: fewer repeats then.
                (name, timed(client, path, params, headers, 5 if args.no_rollup else args.repeat))
                for name, path, params in queries(end_at, span)
            ]
        engine.dispose()
    print(f"\n== 3. telemetry queries over {args.rows:,} raw windows, {args.devices:,} devices (PostgreSQL) ==")
    print(f"bulk load (INSERT ... SELECT generate_series, in PostgreSQL) {load_s:8.1f} s")
    print(
        "rollup job, one catch-up pass                               "
        + (f"{rollup_s:8.1f} s" if rollup_s else "  skipped")
    )
    print(f"{'query (GET through the ASGI app, in process)':<52} {'p50 ms':>8} {'p95 ms':>8}  target p95 < 100 ms")
    for name, times in results:
        p95 = statistics.quantiles(times, n=20)[18]
        print(f"{name:<52} {statistics.median(times):8.1f} {p95:8.1f}  {'ok' if p95 < 100 else 'MISSED'}")


if __name__ == "__main__":
    main()
