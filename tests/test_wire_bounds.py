"""Wire schemas bounded like the database: a device message either fails decoding (counted,
dropped, costing only itself) or fits every column it is stored in, on both databases."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from control_plane.config import Settings
from control_plane.fleet.batch_writer import BatchWriter
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, DeviceEvent, TelemetryRecord
from shared import limits
from shared.messages import EventMessage, MessageDecodeError, TelemetryMessage, decode, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.state import DeviceState
from shared.telemetry import REQUEST_DURATION_BUCKETS
from shared.topics import TopicKind, Topics
from tests.support.telemetry import add_devices
from tests.support.waiting import wait_for
from tests.test_cp_metrics import scrape, value
from tests.test_rollouts import _control_plane

SHA = "ab" * 32
T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
MOSQUITTO = "mqtt://127.0.0.1:1883"


def telemetry(**fields: Any) -> dict[str, Any]:
    body = {"message_id": uuid.uuid4().hex, "seq": 1, "window_start": (T0 - timedelta(seconds=60)).isoformat(),
            "window_end": T0.isoformat(), "model": "tiny", "version": "1", "requests": 10, "errors": 0}  # fmt: skip
    return body | fields


def state(**fields: Any) -> dict[str, Any]:
    return {"message_id": uuid.uuid4().hex, "phase": "committed"} | fields


def event(**fields: Any) -> dict[str, Any]:
    return {"message_id": uuid.uuid4().hex, "kind": "error"} | fields


def ref(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "version": "1", "sha256": SHA, "format": "gguf"} | fields


def histogram(overflow: int) -> dict[str, Any]:
    return {"bounds": list(REQUEST_DURATION_BUCKETS), "counts": [0] * len(REQUEST_DURATION_BUCKETS) + [overflow]}


# Each passed the wire schema before and fails a column (or a gate's arithmetic) after it.
OUT_OF_BOUNDS: list[tuple[str, dict[str, Any]]] = [
    ("telemetry", telemetry(version="v" * 100)),
    ("telemetry", telemetry(model="m" * 200)),
    ("telemetry", telemetry(requests=2**70)),
    ("telemetry", telemetry(requests=-5)),
    ("telemetry", telemetry(errors=-5)),
    ("telemetry", telemetry(errors=11)),  # more errors than requests
    ("telemetry", telemetry(requests=10**9)),  # a billion requests in a minute
    ("telemetry", telemetry(seq=2**64)),
    ("telemetry", telemetry(message_id="x" * 65)),
    ("telemetry", telemetry(version="1\x00")),
    ("telemetry", telemetry(version="\ud800")),
    ("telemetry", telemetry(window_end=(T0 - timedelta(days=1)).isoformat())),  # ends before it starts
    ("telemetry", telemetry(window_start=(T0 - timedelta(days=3)).isoformat())),
    ("telemetry", telemetry(window_start="2026-12-06T07:59:00")),  # no time zone
    # The rollup job steps a minute past a window's end: in year 9999 it overflowed, every pass.
    ("telemetry", telemetry(window_start="9999-12-31T23:58:00Z", window_end="9999-12-31T23:59:30Z")),
    ("telemetry", telemetry(window_start="0001-01-01T00:00:00Z", window_end="0001-01-01T00:01:00Z")),
    ("telemetry", telemetry(latency_histogram=histogram(11))),  # counts more requests than it has
    ("telemetry", telemetry(latency_histogram={"bounds": [0.1], "counts": [1, 2, 3]})),
    ("telemetry", telemetry(latency_histogram={"bounds": [0.2, 0.1], "counts": [0, 0, 0]})),
    ("telemetry", telemetry(latency_s={"count": 1, "p95": -1.0})),
    ("telemetry", telemetry(latency_s={"count": 1, "p95": 1e308})),
    ("telemetry", telemetry(system={"rss_bytes": 2**70})),
    ("telemetry", telemetry(system={"peak_rss_bytes": -1})),
    ("telemetry", telemetry(error_types={f"e{i}": 0 for i in range(100)})),
    ("state", state(current=ref(version="v" * 100))),
    ("state", state(current=ref(model="m" * 200))),
    ("state", state(desired_message_id="d" * 65)),
    ("state", state(previous=ref(version="1\x00"))),
    ("events", event(version="v" * 100)),
    ("events", event(detail={"n": 2**70})),  # orjson writes JSON columns: 64-bit integers at most
    ("events", event(detail={"blob": "x" * 100_000})),
    ("events", event(bytes_done=2**70)),
    ("status", {"status": "online", "hardware": {"accelerators": ["npu"] * 1000}}),
    ("status", {"status": "online", "hardware": {"ram_mb": 2**70}}),
]


@pytest.mark.parametrize(("kind", "body"), OUT_OF_BOUNDS)
def test_out_of_bound_messages_are_refused_by_the_schema(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(MessageDecodeError) as info:
        decode(kind, json.dumps(body).encode())
    assert info.value.reason == "invalid"


def test_counts_may_be_zero_and_free_text_is_cut_to_its_column() -> None:
    window = decode("telemetry", json.dumps(telemetry(requests=0, errors=0)).encode())
    assert window.requests == 0  # type: ignore[attr-defined]
    long = decode("state", json.dumps(state(reason="é" * 10_000 + "\x00")).encode())
    assert long.reason == "é" * limits.REASON_CHARS  # type: ignore[attr-defined]
    nul = decode("events", json.dumps(event(message="bad\x00byte \ud800")).encode())
    assert nul.message == "bad\ufffdbyte ?"  # type: ignore[attr-defined]
    # The agent's own models stay constructible with what it produces.
    assert DeviceState(reason="x" * 5000).reason == "x" * limits.REASON_CHARS


@pytest.mark.parametrize("field", [{"model": "m" * 129}, {"version": "v" * 65}, {"message_id": "i" * 65}])
def test_a_desired_state_beyond_the_columns_is_refused_before_the_agent_acts_on_it(field: dict[str, str]) -> None:
    artifact = {"sha256": SHA, "size_bytes": 1, "format": "gguf"}
    desired = {"message_id": "m1", "model": "tiny", "version": "1", "artifact": artifact} | field
    with pytest.raises(MessageDecodeError) as info:
        decode("desired", json.dumps(desired).encode())
    assert info.value.reason == "invalid"


def _stored_or_refused(engine: sa.Engine, device_id: str, kind: str, body: dict[str, Any]) -> str:
    try:
        message = decode(kind, json.dumps(body).encode())
    except MessageDecodeError:
        return "refused"
    writer = IngestWriter(engine)
    writer([DeviceMessage(device_id, TopicKind(kind), message, f"t/{kind}", datetime.now(UTC))])
    return "stored"


@pytest.mark.parametrize(("kind", "body"), OUT_OF_BOUNDS)
def test_what_the_schema_accepts_the_database_stores(engine: sa.Engine, kind: str, body: dict[str, Any]) -> None:
    (device,) = add_devices(engine, f"bounds-{uuid.uuid4().hex[:8]}")
    # Before, many passed the schema and failed the insert (PostgreSQL: value too long, integer
    # out of range, NUL in text; both: a Python int too large for the driver or for orjson).
    assert _stored_or_refused(engine, device, kind, body) in ("stored", "refused")


def test_messages_at_every_bound_are_stored(engine: sa.Engine) -> None:
    (device,) = add_devices(engine, f"edge-{uuid.uuid4().hex[:8]}")
    day = limits.MAX_WINDOW_S
    most = limits.MAX_REQUESTS_PER_S * day
    window = telemetry(message_id="m" * limits.MESSAGE_ID_CHARS, seq=limits.INT64_MAX, model="é" * limits.MODEL_CHARS,
                       version="v" * limits.VERSION_CHARS, window_start=(T0 - timedelta(seconds=day)).isoformat(),
                       requests=most, errors=most, latency_histogram=histogram(most),
                       latency_s={"count": most, "p50": limits.MAX_MEASURE, "max": limits.MAX_MEASURE},
                       system={"rss_bytes": limits.MAX_BYTES, "peak_rss_bytes": limits.MAX_BYTES})  # fmt: skip
    current = ref(model="m" * limits.MODEL_CHARS, version="v" * limits.VERSION_CHARS)
    report = state(reason="é" * 5000, current=current, previous=current, desired_message_id="f" * 64)
    detail = {"n": limits.INT64_MAX, "text": "x" * (limits.MAX_DETAIL_BYTES - 40)}
    note = event(model="m" * limits.MODEL_CHARS, version="v" * limits.VERSION_CHARS, message="é" * 9000,
                 detail=detail, bytes_done=limits.INT64_MAX)  # fmt: skip
    hardware = {"cpu_model": "c" * 9000, "ram_mb": limits.MAX_BYTES >> 20, "accelerators": ["a" * 64] * 32}
    for kind, body in (("telemetry", window), ("state", report), ("events", note),
                       ("status", {"status": "online", "hardware": hardware})):  # fmt: skip
        assert _stored_or_refused(engine, device, kind, body) == "stored", kind
    with Session(engine) as session:
        row = session.execute(sa.select(TelemetryRecord).where(TelemetryRecord.device_id == device)).scalar_one()
        assert (row.requests, row.seq, row.version) == (most, limits.INT64_MAX, "v" * limits.VERSION_CHARS)
        stored = session.get(Device, device)
        assert stored is not None and stored.phase_reason == "é" * limits.REASON_CHARS
        assert stored.acked_message_id is None  # 64 characters: not an id the control plane sent
        assert session.execute(sa.select(DeviceEvent).where(DeviceEvent.device_id == device)).scalar_one()


class CountingWriter:
    """The real ingest writer, recording the size of every batch it is handed."""

    def __init__(self, engine: sa.Engine) -> None:
        self.writer = IngestWriter(engine)
        self.sizes: list[int] = []

    def __call__(self, batch: list[DeviceMessage]) -> None:
        self.sizes.append(len(batch))
        self.writer(batch)


def test_a_value_the_database_refuses_costs_only_its_own_message(engine: sa.Engine) -> None:
    # Should a value ever pass the schema and fail a column, the batch is split at once (no retry
    # pauses, no halving budget spent): every other message is stored, the bad ones counted.
    (device,) = add_devices(engine, f"gap-{uuid.uuid4().hex[:8]}")
    batch = []
    for seq in range(400):
        message = TelemetryMessage.model_validate(telemetry(seq=seq))
        if seq % 10 == 3:
            message = message.model_copy(update={"requests": 2**70})  # as a gap in the schema would let in
        batch.append(DeviceMessage(device, TopicKind.TELEMETRY, message, "t/telemetry", datetime.now(UTC)))
    handler = CountingWriter(engine)
    ingest = BatchWriter(handler)
    ingest.start()
    ingest.submit(batch)
    ingest.stop()
    with Session(engine) as session:
        query = sa.select(sa.func.count()).select_from(TelemetryRecord).where(TelemetryRecord.device_id == device)
        assert session.execute(query).scalar_one() == 360
    assert ingest.counters.lost == 0 and ingest.counters.dispatched == 360
    assert handler.sizes.count(400) == 1  # the whole batch was not retried
    assert ingest.counters.unstorable == 40


# -- one device floods out-of-bound messages; another's events are all stored -----------------------


@pytest.fixture
def control_plane(tmp_path, db_url, engine) -> Iterator[tuple[TestClient, Settings]]:  # type: ignore[no-untyped-def]
    yield from _control_plane(tmp_path, db_url, engine, tick_s=60)


def _flood(topics: Topics, device: str, count: int) -> list[Outgoing]:
    """What the issue's device sent: values past the columns, interleaved telemetry and state."""
    out = []
    for i in range(count):
        if i % 2:
            body, kind = telemetry(seq=i, requests=2**70), "telemetry"
        else:
            body, kind = state(current=ref(version=f"{i}-" + "v" * 100)), "state"
        out.append(Outgoing(topics.device(device, kind), json.dumps(body).encode()))
    return out


@pytest.mark.mosquitto
def test_a_flooding_device_costs_another_devices_messages_nothing(control_plane, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    client, settings = control_plane
    topics = Topics(settings.mqtt_topic_prefix)
    flooder, honest = add_devices(engine, f"flood-{uuid.uuid4().hex[:6]}", f"honest-{uuid.uuid4().hex[:6]}")
    good = [Outgoing(topics.events(honest), encode(EventMessage(kind="download_progress", message=str(i))))
            for i in range(100)]  # fmt: skip
    bad = _flood(topics, flooder, 200)
    mixed = [m for pair in zip(bad[::2], bad[1::2], good, strict=True) for m in pair]
    publisher = MqttClient(MOSQUITTO, client_id=f"flood-{uuid.uuid4().hex[:6]}")
    publisher.start()
    try:
        publisher.publish_many(mixed, timeout_s=60)

        def stored() -> int:
            with Session(engine) as session:
                query = sa.select(sa.func.count()).select_from(DeviceEvent).where(DeviceEvent.device_id == honest)
                return int(session.execute(query).scalar_one())

        wait_for(lambda: stored() == 100, timeout_s=60, what="the honest device's 100 events")

        def rejected(reason: str) -> float:
            return value(scrape(client), "slmops_ingest_rejected_total", reason=reason)

        wait_for(lambda: rejected("invalid") >= 200, what="every flooded message counted")
        assert rejected("invalid") == 200
        assert rejected("handler_failed") == 0  # none lost
    finally:
        publisher.stop()
    with Session(engine) as session:
        flooded = session.get(Device, flooder)
        assert flooded is not None and flooded.current_version is None  # nothing of the flood stored
        windows = sa.select(sa.func.count()).select_from(TelemetryRecord).where(TelemetryRecord.device_id == flooder)
        assert session.execute(windows).scalar_one() == 0  # so nothing a gate could count against a model
