"""Raw telemetry partitioned by day on PostgreSQL: retention drops days, numbers stay the same."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane import db
from control_plane.telemetry import partitions
from control_plane.telemetry.rollup import HOUR, RetentionPolicy, run_rollup
from control_plane.telemetry.series import SeriesQuery, series
from tests.support.telemetry import add_devices, ingest, window
from tests.support.waiting import wait_for

DAY = 86400
# Days of their own: the session's database keeps the partitions other tests create.
FIRST_DAY = date(2025, 3, 1)
DAYS = [FIRST_DAY + timedelta(days=i) for i in range(4)]


def _noon(day: date, minutes: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC) + timedelta(minutes=minutes)


def _count(engine: sa.Engine, table: str = "telemetry_windows", where: str = "TRUE") -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {where}")).scalar_one())


def _exists(engine: sa.Engine, name: str) -> bool:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": f"{partitions.SCHEMA}.{name}"}).scalar()
    return found is not None


@pytest.fixture
def pg(app, engine: sa.Engine) -> sa.Engine:  # type: ignore[no-untyped-def]
    if engine.dialect.name != "postgresql":
        pytest.skip("partitions are PostgreSQL's; SQLite keeps one plain table")
    return engine  # `app` empties every table after the test


def _create_days(engine: sa.Engine, days: list[date]) -> None:
    with Session(engine) as session:
        existing = partitions.day_partitions(session)
        for day in days:
            if day not in existing:
                partitions.create_day(session, day)
        session.commit()


def _three_windows_a_day(engine: sa.Engine, days: list[date]) -> str:
    (device,) = add_devices(engine, "dev-days")
    ingest(engine, [window(device, _noon(day, m), {3: 2 + m}) for day in days for m in range(3)])
    return device


def test_retention_drops_expired_day_partitions_and_leaves_the_others(pg: sa.Engine) -> None:
    _create_days(pg, DAYS)
    device = _three_windows_a_day(pg, DAYS)
    stray = _noon(FIRST_DAY - timedelta(days=20))  # a day with no partition: the default one holds it
    ingest(pg, [window(device, stray, {3: 1})])
    assert _count(pg, f"{partitions.DEFAULT}", f"window_end = '{stray.isoformat()}'") == 1

    policy = RetentionPolicy(raw_s=2 * DAY, minute_s=60 * DAY, hour_s=400 * DAY)
    with Session(pg) as session:  # cutoff: noon of the second day; the first day ended before it
        report = run_rollup(session, policy, now=_noon(DAYS[3]))

    first = f"telemetry_windows_p{FIRST_DAY:%Y%m%d}"
    assert report.partitions_dropped == [first]
    assert not _exists(pg, first)
    assert report.raw_deleted == 1  # the stray row, deleted from the default partition
    kept = {day: _count(pg, where=f"window_end::date = '{day}'") for day in DAYS}
    assert kept == {DAYS[0]: 0, DAYS[1]: 3, DAYS[2]: 3, DAYS[3]: 3}  # the cutoff's own day stays whole
    for day in DAYS[1:]:
        assert _count(pg, f"{partitions.SCHEMA}.telemetry_windows_p{day:%Y%m%d}") == 3
    assert _count(pg, partitions.DEFAULT, f"device_id = '{device}'") == 0


def test_a_window_for_a_day_without_partition_is_stored_and_moves_when_the_day_is_created(pg: sa.Engine) -> None:
    (device,) = add_devices(pg, "dev-late")
    day = date(2025, 1, 10)
    message = window(device, _noon(day), {3: 4})
    writer = ingest(pg, [message])
    assert writer.counters["telemetry"] == 1
    assert _count(pg, partitions.DEFAULT, f"device_id = '{device}'") == 1

    _create_days(pg, [day])  # the rollup job's create-ahead, for a day the default already holds
    assert _count(pg, partitions.DEFAULT, f"device_id = '{device}'") == 0
    assert _count(pg, f"{partitions.SCHEMA}.telemetry_windows_p{day:%Y%m%d}", f"device_id = '{device}'") == 1
    again = ingest(pg, [message])  # a redelivery: the same message id and window_end
    assert again.counters["duplicate_telemetry"] == 1
    assert _count(pg, where=f"device_id = '{device}'") == 1


def test_a_day_created_while_an_insert_into_the_default_partition_is_in_flight_takes_its_row(
    pg: sa.Engine,
) -> None:
    """Ingest writes while the rollup job attaches a day: the attach waits for the insert, then
    moves its row, instead of failing on it (or the insert failing on the new bounds)."""
    (device,) = add_devices(pg, "dev-inflight")
    day = date(2025, 2, 3)
    failures: list[BaseException] = []

    def create() -> None:
        try:
            _create_days(pg, [day])
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    with pg.connect() as ingest_conn:
        with ingest_conn.begin():
            _insert_raw(ingest_conn, uuid.uuid4().hex, device, _noon(day))  # routed to the default partition
            creator = threading.Thread(target=create)
            creator.start()
            wait_for(lambda: _waiting_locks(pg) > 0 or not creator.is_alive(), what="the attach to wait for the insert")
        creator.join(timeout=60)
    assert failures == []
    assert _count(pg, f"{partitions.SCHEMA}.telemetry_windows_p{day:%Y%m%d}", f"device_id = '{device}'") == 1
    assert _count(pg, partitions.DEFAULT, f"device_id = '{device}'") == 0


def _insert_raw(conn: sa.Connection, message_id: str, device_id: str, end: datetime) -> None:
    """One window written in SQL, as ingest writes it, on a connection the caller holds."""
    columns = "id, device_id, message_id, seq, window_start, window_end, requests, errors, rss_bytes, "
    columns += "peak_rss_bytes, latency_histogram, received_at"
    values = "(:id, :device, :id, 0, :t, :t, 1, 0, 0, 0, '{}', :t)"
    conn.execute(
        sa.text(f"INSERT INTO telemetry_windows ({columns}) VALUES {values}"),
        {"id": message_id, "device": device_id, "t": end},
    )


def _waiting_locks(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar_one())


def test_the_rollup_job_creates_partitions_ahead(pg: sa.Engine) -> None:
    with Session(pg) as session:
        run_rollup(session, RetentionPolicy(raw_s=30 * DAY, minute_s=60 * DAY, hour_s=400 * DAY))
        days = partitions.day_partitions(session)
    today = datetime.now(UTC).date()
    for offset in range(-1, partitions.AHEAD_DAYS + 1):
        assert today + timedelta(days=offset) in days


def test_rollups_and_series_over_several_days(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    """The same numbers on both backends: partitioned (PostgreSQL) and plain (SQLite)."""
    days = [date(2025, 5, 1) + timedelta(days=i) for i in range(3)]
    if engine.dialect.name == "postgresql":
        _create_days(engine, days[:2])  # the third day lands in the default partition
    _three_windows_a_day(engine, days)
    query = SeriesQuery(start=_noon(days[0]), end=_noon(days[2], 60), step_s=HOUR, model="tiny", version="1")
    with Session(engine) as session:
        raw = [p["requests"] for p in series(session, query)["points"] if p["requests"]]
        run_rollup(session, RetentionPolicy(raw_s=400 * DAY, minute_s=400 * DAY, hour_s=400 * DAY), now=_noon(days[2]))
        rolled = series(session, query)
    assert raw == [9, 9, 9]  # 2 + 3 + 4 requests at noon of each day
    assert rolled["sources"][0] == "rollup_3600s"
    assert [p["requests"] for p in rolled["points"] if p["requests"]] == [9, 9, 9]


def test_migration_moves_existing_rows_into_partitions_and_back(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("postgres")
    db.upgrade(url, "0014")
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            for i, day in enumerate(DAYS):
                _insert_raw(conn, f"m{i}", "d", _noon(day))
        db.upgrade(url)
        with Session(engine) as session:
            assert partitions.is_partitioned(session)
            assert sorted(partitions.day_partitions(session)) == DAYS
        assert _count(engine) == 4
        assert _count(engine, partitions.DEFAULT) == 0

        db.downgrade(url, "0014")
        with Session(engine) as session:
            assert not partitions.is_partitioned(session)
        assert _count(engine) == 4
        assert not _exists(engine, "telemetry_windows_default")
    finally:
        engine.dispose()
