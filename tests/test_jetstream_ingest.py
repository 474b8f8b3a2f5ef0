"""Ingest from a JetStream stream through one durable consumer: devices publish over nats-server's
MQTT listener, control-plane replicas split the stream, and a replica killed -9 mid-batch loses
nothing (its unacknowledged messages go to the other, stored once)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pydantic
import pytest
import sqlalchemy as sa

from control_plane.config import Settings
from control_plane.fleet.channel import FleetRuntime
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.jetstream import JetStreamIngest, stream_subjects, subject_of, topic_of
from control_plane.metrics import FleetCollector
from shared.messages import StateMessage, StatusMessage, encode
from shared.state import DeviceState
from shared.topics import Topics
from tests.support.jetstream import (
    NatsClusterProcesses,
    NatsServerProcess,
    nats_server_binary,
    publish_over_mqtt,
    telemetry_payloads,
)
from tests.support.telemetry import add_devices
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg_url(db_url: str) -> str:
    """The PostgreSQL database the replicas of a test share (as replicas share one in production)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database")
    return db_url


@pytest.fixture
def pg_engine(pg_url: str, empty_tables: sa.Engine) -> sa.Engine:
    """The session's engine on it; the next test starts from empty tables."""
    return empty_tables


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def _settings(tmp_path: Path, pg_url: str, nats_server: NatsServerProcess, prefix: str, name: str) -> Settings:
    return Settings(
        data_dir=tmp_path / name,
        database_url=pg_url,
        mqtt_url=nats_server.mqtt_url,
        mqtt_topic_prefix=prefix,
        mqtt_client_id=f"cp-{name}-{uuid.uuid4().hex[:6]}",
        ingest_source="jetstream",
        ingest_nats_urls=nats_server.url,  # type: ignore[arg-type]  # as read from the environment
    )


def _stored_windows(engine: sa.Engine, device_ids: list[str]) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM telemetry_windows WHERE device_id = ANY(:ids)")
        return int(conn.execute(query, {"ids": device_ids}).scalar_one())


def _distinct_windows(engine: sa.Engine, device_ids: list[str]) -> int:
    with engine.connect() as conn:
        query = sa.text(
            "SELECT count(*) FROM (SELECT DISTINCT device_id, message_id FROM telemetry_windows "
            "WHERE device_id = ANY(:ids)) AS d"
        )
        return int(conn.execute(query, {"ids": device_ids}).scalar_one())


def _stream_messages(url: str, stream: str = "SLMOPS_DEVICES") -> int:
    """Messages left in the (work-queue) stream: those not acknowledged yet."""

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


def test_subjects_map_back_to_the_topics_devices_publish() -> None:
    topics = Topics("slmops/v1")
    assert stream_subjects(topics) == [
        "slmops.v1.devices.*.state", "slmops.v1.devices.*.telemetry",
        "slmops.v1.devices.*.events", "slmops.v1.devices.*.status",
    ]  # fmt: skip
    topic = topics.telemetry("gw-1.rack:2")
    assert subject_of(topic) == "slmops.v1.devices.gw-1//rack:2.telemetry"
    assert topic_of(subject_of(topic)) == topic


def test_jetstream_ingest_needs_nats_and_an_external_broker(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="SLMOPS_INGEST_NATS_URLS"):
        Settings(data_dir=tmp_path, ingest_source="jetstream", mqtt_url="mqtt://127.0.0.1:1883")
    with pytest.raises(pydantic.ValidationError, match="SLMOPS_MQTT_URL"):
        Settings(data_dir=tmp_path, ingest_source="jetstream", ingest_nats_urls="nats://127.0.0.1:4222")  # type: ignore[arg-type]
    assert Settings(data_dir=tmp_path).ingest_source == "mqtt"  # the default is unchanged


def test_messages_devices_publish_over_mqtt_are_stored_exactly_once(
    tmp_path: Path, pg_url: str, pg_engine: sa.Engine, nats_server: NatsServerProcess
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    topics = Topics(prefix)
    device_ids = add_devices(pg_engine, *(f"js-{uuid.uuid4().hex[:8]}" for _ in range(3)))
    runtime = FleetRuntime(_settings(tmp_path, pg_url, nats_server, prefix, "one"), pg_engine)
    runtime.start()
    try:
        windows = telemetry_payloads(topics, device_ids, per_device=20)
        # Every window twice (a device's QoS 1 retry), a malformed one, and a device going offline.
        offline = (topics.status(device_ids[0]), encode(StatusMessage(status="offline", reason="shutdown")))
        junk = (topics.events(device_ids[1]), b"{not json")
        publish_over_mqtt(nats_server.mqtt_port, windows + windows + [junk, offline], client_id="js-devices")
        wait_for(lambda: _stored_windows(pg_engine, device_ids) >= 60, timeout_s=20)
        wait_for(lambda: _stream_messages(nats_server.url) == 0, timeout_s=10)  # all acknowledged
        assert _stored_windows(pg_engine, device_ids) == 60
        counters = runtime.subscriber.counters  # type: ignore[union-attr]
        assert counters.received == 122
        assert counters.duplicates + runtime.ingest.counters["duplicate_telemetry"] == 60
        assert counters.malformed_total == 1
        with pg_engine.connect() as conn:
            status = conn.execute(sa.text("SELECT status FROM devices WHERE id = :i"), {"i": device_ids[0]})
            assert status.scalar_one() == "offline"
    finally:
        runtime.stop()


class _SlowWriter(IngestWriter):
    """Takes 0.1 s per batch besides the write: one replica cannot take the whole stream alone."""

    def __call__(self, batch: list[Any]) -> None:
        time.sleep(0.1)
        super().__call__(batch)


def test_two_replicas_split_the_stream_and_together_store_everything(
    tmp_path: Path, pg_url: str, pg_engine: sa.Engine, nats_server: NatsServerProcess
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    device_ids = add_devices(pg_engine, *(f"js-split-{uuid.uuid4().hex[:8]}" for _ in range(10)))
    replicas = [FleetRuntime(_settings(tmp_path, pg_url, nats_server, prefix, n), pg_engine) for n in ("r1", "r2")]
    try:
        for replica in replicas:
            replica.ingest = _SlowWriter(pg_engine)
            replica.start()
        windows = telemetry_payloads(Topics(prefix), device_ids, per_device=400)
        publish_over_mqtt(nats_server.mqtt_port, windows, client_id="js-split-devices")
        wait_for(lambda: _stored_windows(pg_engine, device_ids) >= 4000, timeout_s=60)
        wait_for(lambda: _stream_messages(nats_server.url) == 0, timeout_s=10)
        stored = [replica.ingest.counters["telemetry"] for replica in replicas]
        assert all(count >= 400 for count in stored), stored  # each took a real share
        assert sum(stored) == 4000 and _stored_windows(pg_engine, device_ids) == 4000
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_killed_mid_batch_loses_nothing_and_the_other_stores_it_once(
    tmp_path: Path, pg_url: str, pg_engine: sa.Engine, nats_server: NatsServerProcess
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    device_ids = add_devices(pg_engine, *(f"js-kill-{uuid.uuid4().hex[:8]}" for _ in range(10)))
    marker = tmp_path / "victim"
    # The victim commits its second batch, then hangs before acknowledging it; batches it fetched
    # behind that one are neither stored nor acknowledged.
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.support.jetstream_replica", pg_url, nats_server.url, prefix, str(marker),
         "--hang-after", "2", "--ack-wait", "2"],
        cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    survivor: JetStreamIngest | None = None
    try:
        wait_for(lambda: marker.exists() and marker.read_text() == "ready", timeout_s=20)
        windows = telemetry_payloads(Topics(prefix), device_ids, per_device=60)
        publish_over_mqtt(nats_server.mqtt_port, windows, client_id="js-kill-devices")
        wait_for(lambda: marker.read_text().startswith("hung"), timeout_s=20)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        stored, acked = (int(n) for n in marker.read_text().split()[1:])
        assert 0 < acked < stored == _stored_windows(pg_engine, device_ids) < 600
        assert _stream_messages(nats_server.url) == 600 - acked  # the hung batch stays unacknowledged

        writer = IngestWriter(pg_engine)
        survivor = JetStreamIngest([nats_server.url], Topics(prefix), writer, name="survivor")
        survivor.start()
        wait_for(lambda: _stream_messages(nats_server.url) == 0, timeout_s=30)
        assert _stored_windows(pg_engine, device_ids) == _distinct_windows(pg_engine, device_ids) == 600
        assert writer.counters["duplicate_telemetry"] == stored - acked  # committed, never acknowledged
        assert survivor.counters.dispatched == 600 - acked
    finally:
        if survivor is not None:
            survivor.stop()
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)


@dataclass
class _Fleet:
    """What FleetCollector reads of a FleetRuntime: its writer and its ingest source."""

    ingest: IngestWriter
    subscriber: JetStreamIngest


class _DatabaseDown(IngestWriter):
    """Refuses every write while `down` is set, as a database restarting does."""

    down = True

    def __call__(self, batch: list[Any]) -> None:
        if self.down:
            raise sa.exc.OperationalError("INSERT", {}, Exception("the database is restarting"))
        super().__call__(batch)


def test_a_batch_the_database_refuses_comes_back_and_an_older_state_does_not_win(
    tmp_path: Path, pg_engine: sa.Engine, nats_server: NatsServerProcess
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    topics = Topics(prefix)
    [device_id] = add_devices(pg_engine, f"js-down-{uuid.uuid4().hex[:8]}")
    writer = _DatabaseDown(pg_engine)
    ingest = JetStreamIngest([nats_server.url], topics, writer, name="down")
    ingest.start()
    try:
        older = StateMessage.wrap(DeviceState(device_id=device_id, phase="downloading"))
        newer = StateMessage.wrap(DeviceState(device_id=device_id, phase="committed"))
        states = [(topics.state(device_id), encode(older)), (topics.state(device_id), encode(newer))]
        publish_over_mqtt(nats_server.mqtt_port, states, client_id="js-down")
        wait_for(lambda: ingest.counters.handed_back == 2, timeout_s=30)  # after the retries: naked
        writer.down = False
        # Both come back (REDELIVER_AFTER_FAILURE_S); the older finds the newer behind it in the
        # stream and is not applied (in a batch of its own it would have rolled the device back).
        wait_for(lambda: _stream_messages(nats_server.url) == 0, timeout_s=20)
        assert ingest.counters.superseded == 1
        with pg_engine.connect() as conn:
            phase = conn.execute(sa.text("SELECT phase FROM devices WHERE id = :i"), {"i": device_id}).scalar_one()
        assert phase == "committed"
        assert ingest.counters.lost == 0 and writer.counters["state"] == 1
        samples = {
            (m.name, s.labels.get("reason")): s.value
            for m in FleetCollector(pg_engine, _Fleet(writer, ingest)).collect()
            for s in m.samples
        }
        assert samples[("slmops_ingest_rejected", "superseded")] == 1
        assert samples[("slmops_ingest_handed_back", None)] == 2
    finally:
        ingest.stop()


def test_ingest_resumes_after_the_nats_server_restarts(tmp_path: Path, nats_server: NatsServerProcess) -> None:
    topics = Topics(f"slmops-test/{uuid.uuid4().hex[:10]}")
    stored: list[Any] = []
    ingest = JetStreamIngest([nats_server.url], topics, stored.extend, name="restart")
    ingest.start()
    try:
        windows = telemetry_payloads(topics, [f"dev-{i}" for i in range(10)], per_device=20)
        publish_over_mqtt(nats_server.mqtt_port, windows[:100], client_id="js-restart-1")
        wait_for(lambda: len(stored) == 100, timeout_s=10)
        nats_server.stop()
        nats_server.start()  # same ports, same store: the stream and the durable consumer survive
        publish_over_mqtt(nats_server.mqtt_port, windows[100:], client_id="js-restart-2")
        wait_for(lambda: len(stored) == 200, timeout_s=20)
        assert ingest.counters.lost == 0 and ingest.counters.duplicates == 0
    finally:
        ingest.stop()


def _stream_leader(urls: list[str]) -> str | None:
    """The server name of the stream's leader, or None while there is none (an election)."""

    async def leader() -> str | None:
        nc = await nats.connect(urls, max_reconnect_attempts=1, connect_timeout=2)
        try:
            return (await nc.jetstream().stream_info("SLMOPS_DEVICES")).cluster.leader  # type: ignore[union-attr]
        except Exception:
            return None
        finally:
            await nc.close()

    return asyncio.run(leader())


@pytest.mark.slow
def test_the_stream_leader_killed_mid_ingest_loses_nothing_on_a_three_node_cluster(
    tmp_path: Path, pg_engine: sa.Engine
) -> None:
    cluster = NatsClusterProcesses(tmp_path / "cluster")
    cluster.start()
    replicas: list[JetStreamIngest] = []
    try:
        wait_for(lambda: _jetstream_ready(cluster.urls), timeout_s=30)
        topics = Topics(f"slmops-test/{uuid.uuid4().hex[:10]}")
        device_ids = add_devices(pg_engine, *(f"js-r3-{uuid.uuid4().hex[:8]}" for _ in range(10)))
        writers = [_SlowWriter(pg_engine), _SlowWriter(pg_engine)]
        for name, writer in zip(("r1", "r2"), writers, strict=True):
            replica = JetStreamIngest(cluster.urls, topics, writer, max_batch=50, stream_replicas=3, name=name)
            replica.start(timeout_s=30)
            replicas.append(replica)
        leader = _stream_leader(cluster.urls)
        [killed] = [i for i, node in enumerate(cluster.nodes) if leader == f"slmops-test-{node.port}"]
        devices_node = cluster.nodes[(killed + 1) % 3]  # devices stay on a node that lives
        windows = telemetry_payloads(topics, device_ids, per_device=150)
        # All published before the kill: devices publishing through the election are the broker
        # tier's concern (ADR 0011, Consequences); this test is about the consumer.
        publish_over_mqtt(devices_node.mqtt_port, windows, client_id="js-r3")
        wait_for(lambda: _stored_windows(pg_engine, device_ids) > 0, timeout_s=20)
        cluster.kill(killed)  # mid-ingest: both replicas hold fetched, unacknowledged batches
        assert _distinct_windows(pg_engine, device_ids) < 1500
        wait_for(lambda: _distinct_windows(pg_engine, device_ids) == 1500, timeout_s=90)
        assert _stored_windows(pg_engine, device_ids) == 1500  # each window once, whoever stored it
        assert all(writer.counters["telemetry"] > 0 for writer in writers)
    finally:
        for replica in replicas:
            replica.stop()
        cluster.stop()


def _jetstream_ready(urls: list[str]) -> bool:
    async def ready() -> bool:
        nc = await nats.connect(urls, max_reconnect_attempts=1, connect_timeout=2)
        try:
            await nc.jetstream().account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(ready())
