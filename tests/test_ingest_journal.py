"""The ingest journal: what the control plane acknowledged to the broker and had not stored when
it died is stored after a restart, once; a killed `slmops server` loses no telemetry window."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from control_plane.fleet.journal import IngestJournal
from control_plane.fleet.subscriber import DeviceMessage, DeviceMessageSubscriber
from shared.messages import EventMessage, TelemetryMessage, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind, Topics
from tests.support.mqtt import SYSTEM_MOSQUITTO, ClientFactory, clients, unique_topics
from tests.support.telemetry import add_devices, ingest
from tests.support.waiting import wait_for
from tests.test_rollout_resilience import ServerProcess, _cli_token, server  # noqa: F401  (fixture)

__all__ = ["clients"]  # fixture
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _journal_records(journal: IngestJournal, count: int, *, flush: bool = True) -> list[int]:
    seqs = [journal.record(f"p/devices/d/telemetry/{i}", f"payload {i}".encode(), T0 + timedelta(seconds=i))
            for i in range(count)]  # fmt: skip
    if flush:
        journal.flush()
    return seqs


def test_what_was_flushed_and_not_stored_comes_back_after_a_crash_in_order(tmp_path: Path) -> None:
    journal = IngestJournal(tmp_path, segment_records=4)
    seqs = _journal_records(journal, 10)
    journal.stored_up_to(seqs[5])
    _journal_records(journal, 2, flush=False)  # recorded, never written: never acknowledged either
    # The process dies here (no close). A new one reads what is left.
    again = IngestJournal(tmp_path, segment_records=4)
    back = list(again.unstored())
    assert [r.seq for r in back] == seqs[6:]
    assert [r.payload for r in back] == [f"payload {i}".encode() for i in range(6, 10)]
    assert back[0].topic == "p/devices/d/telemetry/6" and back[0].received_at == T0 + timedelta(seconds=6)
    assert _journal_records(again, 1)[0] == seqs[-1] + 1  # numbers go on after the restart


def test_segments_go_once_everything_in_them_is_stored(tmp_path: Path) -> None:
    journal = IngestJournal(tmp_path, segment_records=4)
    seqs = _journal_records(journal, 10)  # segments of 4, 4 and 2
    assert len(list(tmp_path.glob("segment-*.log"))) == 3
    journal.stored_up_to(seqs[5])
    assert len(list(tmp_path.glob("segment-*.log"))) == 2  # the first held seqs 1-4 only
    journal.stored_up_to(seqs[9])
    assert len(list(tmp_path.glob("segment-*.log"))) == 1  # the active one stays
    assert list(IngestJournal(tmp_path).unstored()) == []


def test_a_record_torn_by_a_crash_mid_write_ends_the_journal(tmp_path: Path) -> None:
    journal = IngestJournal(tmp_path)
    _journal_records(journal, 3)
    journal.close()
    (segment,) = tmp_path.glob("segment-*.log")
    segment.write_bytes(segment.read_bytes()[:-3])  # the last record's tail never reached the file
    assert [r.payload for r in IngestJournal(tmp_path).unstored()] == [b"payload 0", b"payload 1"]


@pytest.mark.usefixtures("empty_tables")
def test_a_replayed_batch_stores_each_event_and_window_once(engine: sa.Engine) -> None:
    # A batch stored just before a crash, ahead of the journal's watermark, is ingested again.
    (device_id,) = add_devices(engine, f"replay-{uuid.uuid4().hex[:6]}")
    event = EventMessage(kind="download_failed", message="404")
    now = datetime.now(UTC)
    window = TelemetryMessage.wrap(TelemetryWindow(seq=1, window_start=now, window_end=now, requests=3))
    batch = [
        DeviceMessage(device_id, TopicKind.EVENTS, event, "t/events", now),
        DeviceMessage(device_id, TopicKind.TELEMETRY, window, "t/telemetry", now),
    ]
    ingest(engine, batch)
    ingest(engine, batch)
    with engine.connect() as conn:
        events = conn.execute(sa.text("SELECT message_id FROM device_events WHERE device_id = :d"), {"d": device_id})
        windows = conn.execute(sa.text("SELECT count(*) FROM telemetry_windows WHERE device_id = :d"), {"d": device_id})
        assert [row[0] for row in events] == [event.message_id]
        assert windows.scalar_one() == 1


def _windows(topics: Topics, device_id: str, count: int) -> list[Outgoing]:
    now = datetime.now(UTC)
    return [
        Outgoing(
            topics.telemetry(device_id),
            encode(TelemetryMessage.wrap(TelemetryWindow(seq=i, window_start=now, window_end=now, requests=i))),
        )
        for i in range(count)
    ]


class Batches:
    """Stores what it is given; `blocked`: never returns until released (a process about to die)."""

    def __init__(self, *, blocked: bool = False) -> None:
        self.release = threading.Event()
        if not blocked:
            self.release.set()
        self.seqs: list[int] = []

    def __call__(self, batch: list[DeviceMessage]) -> None:
        self.release.wait()
        self.seqs += [m.message.seq for m in batch]  # type: ignore[attr-defined]


@pytest.mark.mosquitto
def test_a_subscriber_replays_what_its_predecessor_acknowledged_and_never_stored(
    tmp_path: Path, clients: ClientFactory
) -> None:
    topics = unique_topics()
    stuck = Batches(blocked=True)
    doomed = DeviceMessageSubscriber(
        clients(SYSTEM_MOSQUITTO, start=False), topics, stuck, journal=IngestJournal(tmp_path)
    )
    doomed.start()
    doomed.client.start(wait=True, timeout_s=15)
    clients(SYSTEM_MOSQUITTO).publish_many(_windows(topics, "dev-1", 50), timeout_s=30)
    wait_for(lambda: doomed.counters.received == 50, what="50 windows read and acknowledged")
    doomed.client.stop(publish_offline=False)  # gone, with its writer stuck on the first batch

    stored = Batches()
    heir = DeviceMessageSubscriber(clients(SYSTEM_MOSQUITTO), topics, stored, journal=IngestJournal(tmp_path))
    heir.start()
    try:
        wait_for(lambda: len(stored.seqs) == 50, what="the 50 windows stored by the next subscriber")
    finally:
        heir.stop()
        doomed._journal = None  # the dead process's writer never gets to report anything
        stuck.release.set()
    assert stored.seqs == list(range(50)) and heir.counters.replayed == 50
    assert list(IngestJournal(tmp_path).unstored()) == []  # all stored: nothing to replay again


@pytest.mark.mosquitto
def test_kill9_of_the_control_plane_loses_no_acknowledged_telemetry(server: ServerProcess, engine: sa.Engine) -> None:  # noqa: F811
    if engine.dialect.name != "postgresql":
        pytest.skip("holds the telemetry table with a PostgreSQL table lock")
    admin = _cli_token(server, "admin")
    api = httpx.Client(base_url=server.base, timeout=30)
    token = api.post("/v1/devices", json={"name": "j1"}, headers=admin).json()["enrollment_token"]
    device_id = api.post("/v1/devices/enroll", json={"enrollment_token": token}).json()["device_id"]
    topics = Topics(server.env["SLMOPS_MQTT_TOPIC_PREFIX"])
    device = MqttClient(SYSTEM_MOSQUITTO, client_id=f"dev-{uuid.uuid4().hex[:8]}")
    device.start(wait=True, timeout_s=15)
    stored = lambda: _count(engine)  # noqa: E731
    try:
        device.publish_many(_windows(topics, device_id, 1), timeout_s=30)
        wait_for(lambda: stored() == 1, what="ingest running")
        with engine.connect() as blocker:
            # The ingest writer waits on the table; the server reads, journals and acknowledges on.
            blocker.execute(sa.text("LOCK TABLE telemetry_windows IN ACCESS EXCLUSIVE MODE"))
            device.publish_many(_windows(topics, device_id, 200), timeout_s=30)
            wait_for(lambda: _received(api) >= 201, what="the server reading all 201 windows")
            time.sleep(0.3)  # and acknowledging them: PUBACKs leave right after each burst is read
            server.kill9()
            blocker.rollback()
        assert stored() == 1  # the writer's transaction died with the process
        server.start()
        wait_for(lambda: stored() == 201, what="every acknowledged window stored after the restart")
    finally:
        device.stop(publish_offline=False)
        api.close()
    assert stored() == 201  # once each


def _received(api: httpx.Client) -> float:
    for family in text_string_to_metric_families(api.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "slmops_mqtt_messages_received_total":
                return sample.value
    return 0.0


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM telemetry_windows")).scalar_one())
