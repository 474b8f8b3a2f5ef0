"""control_plane.db.bulk on both databases: set-based insert, upsert and update of plain rows,
with JSON, timestamps, NULLs and conflicts; what they report matches what the table holds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.db import bulk
from control_plane.models import DesiredStateRow, Device, DeviceEvent, TelemetryRecord, as_utc, new_id
from tests.support.telemetry import add_devices

WINDOWS: sa.Table = TelemetryRecord.__table__  # type: ignore[attr-defined]
DESIRED: sa.Table = DesiredStateRow.__table__  # type: ignore[attr-defined]
DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]
EVENTS: sa.Table = DeviceEvent.__table__  # type: ignore[attr-defined]
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.usefixtures("empty_tables")  # its online devices would join later tests' rollouts


def _n(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"  # the database is shared by the session's tests


def _window(device_id: str, message_id: str, seq: int) -> dict[str, object]:
    return {
        "id": new_id(), "device_id": device_id, "message_id": message_id, "seq": seq,
        "window_start": T0, "window_end": T0 + timedelta(seconds=seq), "model": "m", "version": "1",
        "requests": 10 + seq, "errors": 0, "latency_p50_ms": 1.5, "latency_p95_ms": None, "latency_p99_ms": 3.0,
        "latency_max_ms": 4.0, "ttft_p95_ms": None, "tokens_per_s_p50": 12.0, "rss_bytes": 2**33,
        "peak_rss_bytes": 2**33 + seq, "latency_histogram": {"bounds": [0.1, 1.0], "counts": [seq, 1, 0]},
        "received_at": T0,
    }  # fmt: skip


def test_insert_skips_conflicts_and_counts_what_it_wrote(engine: sa.Engine) -> None:
    a, b = add_devices(engine, _n("bulk-a"), _n("bulk-b"))
    with Session(engine) as session:
        assert bulk.insert(session, WINDOWS, [_window(a, "m1", 1), _window(b, "m1", 2)], skip_conflicts_on=()) == 2
        session.commit()
    with Session(engine) as session:
        rows = [_window(a, "m1", 1), _window(a, "m2", 3), _window(b, "m3", 4)]  # (a, m1) is stored already
        written = bulk.insert(session, WINDOWS, rows, skip_conflicts_on=("device_id", "message_id", "window_end"))
        session.commit()
    assert written == 2
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(WINDOWS.c.device_id, WINDOWS.c.message_id, WINDOWS.c.requests, WINDOWS.c.rss_bytes,
                      WINDOWS.c.latency_p95_ms, WINDOWS.c.latency_histogram, WINDOWS.c.window_end)
            .where(WINDOWS.c.device_id.in_([a, b]))
            .order_by(WINDOWS.c.seq)
        ).all()  # fmt: skip
    assert [(d, m, r) for d, m, r, *_ in stored] == [(a, "m1", 11), (b, "m1", 12), (a, "m2", 13), (b, "m3", 14)]
    assert stored[2].rss_bytes == 2**33 and stored[2].latency_p95_ms is None
    assert stored[3].latency_histogram == {"bounds": [0.1, 1.0], "counts": [4, 1, 0]}
    assert stored[3].window_end.replace(tzinfo=UTC) == T0 + timedelta(seconds=4)


def test_upsert_overwrites_existing_rows_and_inserts_new_ones(engine: sa.Engine) -> None:
    a, b = add_devices(engine, _n("up-a"), _n("up-b"))

    def row(device_id: str, message_id: str, version: str) -> dict[str, object]:
        payload = {"message_id": message_id, "version": version, "nested": {"k": [1, 2]}}
        return {"device_id": device_id, "message_id": message_id, "model": "m", "version": version,
                "artifact_sha256": "0" * 64, "rollout_id": None, "payload": payload,
                "published_message_id": None, "updated_at": T0}  # fmt: skip

    with Session(engine) as session:
        bulk.upsert(session, DESIRED, [row(a, "x1", "1")], key=["device_id"])
        session.commit()
    with Session(engine) as session:
        bulk.upsert(session, DESIRED, [row(a, "x2", "2"), row(b, "y1", "2")], key=["device_id"])
        session.commit()
    with engine.connect() as conn:
        stmt = sa.select(DESIRED.c.device_id, DESIRED.c.payload).where(DESIRED.c.device_id.in_([a, b]))
        stored = dict(conn.execute(stmt).all())
    assert stored == {
        a: {"message_id": "x2", "version": "2", "nested": {"k": [1, 2]}},
        b: {"message_id": "y1", "version": "2", "nested": {"k": [1, 2]}},
    }


def test_update_sets_only_the_given_columns_of_the_matching_rows(engine: sa.Engine) -> None:
    a, b, c = add_devices(engine, _n("upd-a"), _n("upd-b"), _n("upd-c"))
    seen = T0 + timedelta(minutes=5)
    with Session(engine) as session:
        bulk.update(
            session,
            DEVICES,
            [{"id": a, "last_seen": seen, "phase": "committed", "hardware": {"ram_mb": 512}},
             {"id": b, "last_seen": None, "phase": None, "hardware": {}}],
            key=("id",),
        )  # fmt: skip
        session.commit()
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(DEVICES.c.id, DEVICES.c.last_seen, DEVICES.c.phase,
                                                        DEVICES.c.hardware, DEVICES.c.name)
                                              .where(DEVICES.c.id.in_([a, b, c])))}  # fmt: skip
    assert rows[a].last_seen.replace(tzinfo=UTC) == seen and rows[a].phase == "committed"
    assert rows[a].hardware == {"ram_mb": 512} and rows[a].name.startswith("upd-a")
    assert rows[b].last_seen is None and rows[b].phase is None and rows[b].hardware == {}
    assert rows[c].name.startswith("upd-c") and rows[c].phase != "committed"


def test_events_insert_and_empty_batches(engine: sa.Engine) -> None:
    (a,) = add_devices(engine, _n("ev-a"))
    events = [{"id": new_id(), "device_id": a, "kind": k, "detail": {"n": i}, "created_at": T0}
              for i, k in enumerate(["download_started", "download_completed"])]  # fmt: skip
    with Session(engine) as session:
        assert bulk.insert(session, EVENTS, events) == 2
        assert bulk.insert(session, EVENTS, []) == 0
        bulk.upsert(session, DESIRED, [], key=["device_id"])
        bulk.update(session, DEVICES, [], key=("id",))
        session.commit()
    with engine.connect() as conn:
        stored = conn.execute(sa.select(EVENTS.c.kind, EVENTS.c.detail).where(EVENTS.c.device_id == a)).all()
    assert sorted((k, d["n"]) for k, d in stored) == [("download_completed", 1), ("download_started", 0)]


class _Kind(StrEnum):
    onnx_tar = "onnx-tar"  # a name that is not its value, as in ArtifactFormat


def test_enums_are_written_by_value_and_json_keeps_its_shape(engine: sa.Engine) -> None:
    (a,) = add_devices(engine, _n("enum-a"))
    detail = {"nested": {"list": [1, 2.5, None, "x"], "when": "2026-11-23T12:00:00Z"}, "unicode": "größe"}
    event = {"id": new_id(), "device_id": a, "kind": _Kind.onnx_tar, "detail": detail, "created_at": T0}
    with Session(engine) as session:
        assert bulk.insert(session, EVENTS, [event]) == 1
        session.commit()
    with engine.connect() as conn:
        kind, stored = conn.execute(sa.select(EVENTS.c.kind, EVENTS.c.detail).where(EVENTS.c.device_id == a)).one()
    assert (kind, stored) == ("onnx-tar", detail)


def test_a_staging_table_lost_with_a_rollback_is_made_again(engine: sa.Engine) -> None:
    """PostgreSQL's staging tables are created once per connection, and counted only once their
    transaction commits: a rolled-back transaction or savepoint takes its table away."""
    a, b = add_devices(engine, _n("stage-a"), _n("stage-b"))
    one_connection = sa.create_engine(engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0)
    try:
        with Session(one_connection) as session:
            bulk.update(session, DEVICES, [{"id": a, "phase_reason": "rolled back"}], key=("id",))
            session.rollback()
            # The same shape again, on the same connection, after its table went with the rollback.
            bulk.update(session, DEVICES, [{"id": a, "phase_reason": "kept"}], key=("id",))
            session.commit()
            with session.begin_nested() as savepoint:
                bulk.update(session, DEVICES, [{"id": b, "current_model": "m", "phase_reason": "no"}], key=("id",))
                savepoint.rollback()
            session.commit()  # commits nothing: the savepoint's table went with the savepoint
            bulk.update(session, DEVICES, [{"id": b, "current_model": "m", "phase_reason": "yes"}], key=("id",))
            session.commit()
            # Made in a committed transaction, the tables are reused without being created again.
            bulk.update(session, DEVICES, [{"id": b, "current_model": "m2", "phase_reason": "again"}], key=("id",))
            session.commit()
    finally:
        one_connection.dispose()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(DEVICES.c.id, DEVICES.c.current_model, DEVICES.c.phase_reason)
                            .where(DEVICES.c.id.in_([a, b])).order_by(DEVICES.c.name)).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [(a, None, "kept"), (b, "m2", "again")]


def test_timestamps_keep_their_instant_whatever_their_zone_and_precision(engine: sa.Engine) -> None:
    """Timestamps reach PostgreSQL's COPY as ISO text, one formatting per distinct value: rows
    sharing one object, other zones and microseconds must all read back as the same instants."""
    (device,) = add_devices(engine, _n("bulk-ts"))
    india = timezone(timedelta(hours=5, minutes=30))
    shared = T0 + timedelta(microseconds=123456)
    starts = [shared, shared, (T0 + timedelta(hours=1)).astimezone(india), T0.astimezone(india) + timedelta(seconds=1)]
    rows = [
        {**_window(device, f"ts{i}", i), "window_start": start, "received_at": shared} for i, start in enumerate(starts)
    ]
    with Session(engine) as session:
        bulk.insert(session, WINDOWS, rows, skip_conflicts_on=())
        session.commit()
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(WINDOWS.c.window_start, WINDOWS.c.received_at)
            .where(WINDOWS.c.device_id == device)
            .order_by(WINDOWS.c.seq)
        ).all()
    # SQLite hands back naive UTC, PostgreSQL aware values; aware datetimes compare as instants.
    assert [(as_utc(start), as_utc(received)) for start, received in stored] == [(start, shared) for start in starts]


@pytest.mark.parametrize(
    "wanted",
    [
        ["dev-1", "dev-3"],
        ["a\x1fb", "dev-2"],  # holds the separator the values travel with on PostgreSQL
        [""],  # string_to_array('') is no element at all
        ["", "dev-2"],
        [1, 3],
    ],
    ids=["ids", "separator-inside", "lone-empty", "empty-and-id", "ints"],
)
def test_matching_selects_exactly_the_given_values(engine: sa.Engine, wanted: list[object]) -> None:
    strings = isinstance(wanted[0], str)
    universe = ["dev-1", "dev-2", "dev-3", "", "a\x1fb", "a", "b"] if strings else [1, 2, 3, 4]
    kind = sa.Text if strings else sa.Integer
    table = sa.union_all(*(sa.select(sa.literal(v, kind).label("v")) for v in universe)).subquery("u")
    with Session(engine) as session:
        got = set()
        for clause in bulk.matching(session, table.c.v, wanted):
            got |= set(session.execute(sa.select(table.c.v).where(clause)).scalars())
    assert got == set(wanted)
