"""The control plane's own MQTT connections: the configured version (3.1.1 by default), and
replicas sharing the device messages through a shared subscription."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import MQTTProtocolVersion

from control_plane.config import Settings
from control_plane.fleet.channel import FleetRuntime
from shared.messages import TelemetryMessage, encode
from shared.mqtt.client import Outgoing
from shared.telemetry import TelemetryWindow
from shared.topics import Topics
from tests.support.mqtt import SYSTEM_MOSQUITTO, ClientFactory, clients
from tests.support.telemetry import add_devices
from tests.support.waiting import wait_for

__all__ = ["clients"]  # fixtures


GROUP = "0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a"  # a secret in production (see Settings.mqtt_ingest_group)


def _settings(tmp_path: Path, db_url: str, **extra: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "mqtt_url": SYSTEM_MOSQUITTO,
        "mqtt_topic_prefix": f"slmops-test/{uuid.uuid4().hex[:10]}",
        "mqtt_client_id": f"cp-{uuid.uuid4().hex[:8]}",
    }
    return Settings(**(values | extra))  # type: ignore[arg-type]


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, MQTTProtocolVersion.MQTTv311), ("5", MQTTProtocolVersion.MQTTv5), ("auto", MQTTProtocolVersion.MQTTv5)],
)
def test_connections_use_the_configured_protocol(
    tmp_path: Path, db_url: str, engine: sa.Engine, setting: str | None, expected: MQTTProtocolVersion
) -> None:
    extra = {} if setting is None else {"mqtt_protocol": setting}
    runtime = FleetRuntime(_settings(tmp_path, db_url, **extra), engine)
    runtime.start()
    try:
        assert runtime.client is not None and runtime.publisher is not None
        assert (runtime.client.protocol, runtime.publisher.protocol) == (expected, expected)
        assert runtime.client.connected and runtime.publisher.connected
    finally:
        runtime.stop()


def test_an_unknown_protocol_and_a_guessable_ingest_group_are_refused(tmp_path: Path, db_url: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="mqtt_protocol"):
        _settings(tmp_path, db_url, mqtt_protocol="4")
    with pytest.raises(pydantic.ValidationError, match="mqtt_ingest_group"):
        _settings(tmp_path, db_url, mqtt_ingest_group="ingest")


@pytest.mark.mosquitto
@pytest.mark.usefixtures("empty_tables")
def test_replicas_in_one_ingest_group_split_the_device_messages(
    tmp_path: Path, db_url: str, engine: sa.Engine, clients: ClientFactory
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    replicas = [
        FleetRuntime(_settings(tmp_path / f"r{i}", db_url, mqtt_ingest_group=GROUP, mqtt_topic_prefix=prefix), engine)
        for i in range(2)
    ]
    device_ids = add_devices(engine, *(f"dev-{i}" for i in range(4)))
    topics = Topics(prefix)
    try:
        for replica in replicas:
            replica.start()
        device = clients(SYSTEM_MOSQUITTO)
        now = datetime.now(UTC)
        windows = [
            Outgoing(topics.telemetry(device_ids[i % 4]), encode(TelemetryMessage.wrap(_window(i, now))))
            for i in range(200)
        ]
        device.publish_many(windows)
        stored = "SELECT count(*) FROM telemetry_windows"
        wait_for(lambda: _scalar(engine, stored) == 200, timeout_s=20)
    finally:
        for replica in replicas:
            replica.stop()
    shares = [replica.ingest.counters["telemetry"] for replica in replicas]
    assert sum(shares) == 200 and min(shares) > 0, shares  # each window ingested once, by one of them
    assert all(replica.ingest.counters["duplicate_telemetry"] == 0 for replica in replicas)


def _window(seq: int, now: datetime) -> TelemetryWindow:
    return TelemetryWindow(seq=seq, window_start=now - timedelta(seconds=1), window_end=now, requests=1)


def _scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())
