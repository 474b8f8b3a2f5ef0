"""No device takes over another client's broker session, and a revoked device is cut off at once.

Each test runs the control plane against Mosquitto started from the shipped deploy/mosquitto/
config (devices on its device listener, TLS left out) and against the embedded broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel, col, func, select

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.fleet.credentials import client_id_for
from control_plane.models import Device, DeviceEvent, Role
from control_plane.services import auth
from shared.messages import EventMessage, StatusMessage, encode
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import MqttConnectError
from shared.mqtt.url import parse_broker_url
from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess, mosquitto_binary
from tests.support.mqtt import Collector, RawClient, shipped_mosquitto
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@dataclass
class Fleet:
    """A running control plane and the broker its devices use."""

    client: TestClient
    admin: dict[str, str]
    topics: Topics
    settings: Settings
    device_port: int
    broker: MosquittoProcess | None

    def enroll(self, name: str) -> tuple[str, str]:
        created = self.client.post("/v1/devices", json={"name": name}, headers=self.admin).json()
        cred = self.client.post("/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"]}).json()
        return cred["device_id"], cred["device_secret"]

    def device_url(self, device_id: str, secret: str) -> str:
        return f"mqtt://{device_id}:{secret}@127.0.0.1:{self.device_port}"


def _settings(tmp_path: Path, db_url: str, broker: MosquittoProcess | None, device_port: int) -> Settings:
    common = {"data_dir": tmp_path / "data", "database_url": db_url, "controller_tick_s": 0.2}
    if broker is None:
        return Settings(**common, mqtt_port=device_port, mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:8]}")
    return Settings(
        **common,
        mqtt_url=broker.admin_url,
        device_mqtt_url=f"mqtt://127.0.0.1:{device_port}",
        mqtt_password_file=broker.credentials.path,
        mqtt_pid_file=broker.pid_file,
    )


@contextmanager
def broker_for(kind: str, tmp_path: Path) -> Iterator[tuple[MosquittoProcess | None, int]]:
    if kind == "embedded":
        yield None, free_port()
        return
    broker, device_port = shipped_mosquitto(tmp_path / "broker")
    broker.start(devices={})
    try:
        yield broker, device_port
    finally:
        broker.stop()


@contextmanager
def control_plane(settings: Settings, engine: sa.Engine, broker: MosquittoProcess | None) -> Iterator[Fleet]:
    with TestClient(create_app(settings, engine=engine)) as client:
        yield Fleet(client, _admin_headers(engine), Topics(settings.mqtt_topic_prefix), settings,
                    settings.mqtt_port if broker is None else parse_broker_url(settings.device_mqtt_url or "").port,
                    broker)  # fmt: skip


def _admin_headers(engine: sa.Engine) -> dict[str, str]:
    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name=f"admin-{uuid.uuid4().hex[:8]}", role=Role.admin)
        session.commit()
    return {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture
def emptied(engine: sa.Engine) -> Iterator[sa.Engine]:
    yield engine
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def _events_stored(engine: sa.Engine, device_id: str) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).where(col(DeviceEvent.device_id) == device_id)).one())


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_no_device_takes_over_the_control_planes_session(kind, tmp_path, db_url, emptied):  # type: ignore[no-untyped-def]
    """An enrolled device reconnecting with the control plane's client ids (persistent session)
    loses the control plane nothing: every message another device sent is stored, no forged
    desired state reaches that device, and the control plane keeps ingesting afterwards."""
    with broker_for(kind, tmp_path) as (broker, device_port):
        settings = _settings(tmp_path, db_url, broker, device_port)
        with control_plane(settings, emptied, broker) as fleet:
            attacker_id, attacker_secret = fleet.enroll("attacker")
            victim_id, victim_secret = fleet.enroll("victim")
            victim_sees = Collector()
            victim = MqttClient(fleet.device_url(victim_id, victim_secret), client_id=victim_id)
            victim.subscribe(fleet.topics.desired(victim_id), victim_sees)
            victim.start()
            try:
                public_ids = [settings.mqtt_client_id, f"{settings.mqtt_client_id}-pub"]
                runtime = fleet.client.app.state.fleet  # type: ignore[attr-defined]
                assert {runtime.client.client_id, runtime.publisher.client_id}.isdisjoint(public_ids)
                for round_ in range(4):
                    attacker = RawClient(
                        fleet.device_url(attacker_id, attacker_secret), public_ids[round_ % 2], clean_session=False
                    )
                    if attacker.accepted:
                        attacker.paho.publish(fleet.topics.desired(victim_id), b'{"forged": true}', qos=1)
                    _send_events(victim, fleet.topics, victim_id, 25)
                    attacker.close()
                wait_for(lambda: _events_stored(emptied, victim_id) >= 100)
                assert _events_stored(emptied, victim_id) == 100
                _send_events(victim, fleet.topics, victim_id, 100)
                wait_for(lambda: _events_stored(emptied, victim_id) >= 200)
                assert _events_stored(emptied, victim_id) == 200
                assert [p for p in victim_sees.payloads() if b"forged" in p] == []
            finally:
                victim.stop(publish_offline=False)


def _send_events(device: MqttClient, topics: Topics, device_id: str, count: int) -> None:
    for i in range(count):
        device.publish(topics.events(device_id), encode(EventMessage(kind="error", message=f"e{i}")))


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_a_reissued_token_cuts_the_devices_open_connection(kind, tmp_path, db_url, emptied):  # type: ignore[no-untyped-def]
    """Reissuing the enrollment token closes the old credential's live connection at once, and
    what that credential sends afterwards never reaches the registry."""
    with broker_for(kind, tmp_path) as (broker, device_port):
        settings = _settings(tmp_path, db_url, broker, device_port)
        with control_plane(settings, emptied, broker) as fleet:
            device_id, secret = fleet.enroll("gw-1")
            device = MqttClient(fleet.device_url(device_id, secret), client_id=device_id, reconnect_min_delay_s=1)
            device.start()
            try:
                device.publish(fleet.topics.status(device_id), encode(StatusMessage(status="online")), retain=True)
                wait_for(lambda: _device(emptied, device_id).status == "online")
                response = fleet.client.post(f"/v1/devices/{device_id}/enrollment-token", headers=fleet.admin)
                assert response.status_code == 201
                wait_for(lambda: not device.connected and device.last_refusal is not None)
                retry = RawClient(fleet.device_url(device_id, secret), device_id, clean_session=True)
                assert not retry.accepted
                retry.close()
                assert _device(emptied, device_id).status != "online"
            finally:
                device.stop(publish_offline=False)


def _device(engine: sa.Engine, device_id: str) -> Device:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device


@pytest.mark.mosquitto
def test_the_password_file_is_rebuilt_from_the_registry_at_start(tmp_path, db_url, emptied):  # type: ignore[no-untyped-def]
    """A restored old password file (with a device revoked since) and a lost one are both replaced
    by what the registry holds when the control plane starts."""
    with broker_for("mosquitto", tmp_path) as (broker, device_port):
        assert broker is not None
        settings = _settings(tmp_path, db_url, broker, device_port)
        with control_plane(settings, emptied, broker) as fleet:
            kept_id, kept_secret = fleet.enroll("kept")
            revoked_id, revoked_secret = fleet.enroll("revoked")
            old_file = broker.credentials.path.read_text()
            reissued = fleet.client.post(f"/v1/devices/{revoked_id}/enrollment-token", headers=fleet.admin)
            assert reissued.status_code == 201
        urls = {"kept": f"mqtt://{kept_id}:{kept_secret}@127.0.0.1:{device_port}",
                "revoked": f"mqtt://{revoked_id}:{revoked_secret}@127.0.0.1:{device_port}"}  # fmt: skip
        for damage in ("restored", "lost"):
            if damage == "restored":
                broker.credentials.path.write_text(old_file)
                broker.credentials.reload()
            else:
                broker.credentials.path.unlink()
            with control_plane(settings, emptied, broker):
                users = [line.split(":", 1)[0] for line in broker.credentials.path.read_text().splitlines()]
                assert sorted(users) == sorted([kept_id, "slmops-control-plane"]), damage
                wait_for(lambda: _connects(urls["kept"], kept_id), what=damage)
                assert not _connects(urls["revoked"], revoked_id), damage


def _connects(url: str, client_id: str) -> bool:
    client = MqttClient(url, client_id=client_id)
    try:
        client.start(timeout_s=5)
    except MqttConnectError:
        return False
    client.stop(publish_offline=False)
    return True


def test_the_control_planes_client_ids_need_its_broker_password() -> None:
    label = "slmops-control-plane"
    ids = {client_id_for(label, "s1"), client_id_for(label, "s2"), client_id_for(f"{label}-pub", "s1")}
    assert len(ids) == 3 and label not in ids
    assert client_id_for(label, "s1") == client_id_for(label, "s1")  # stable: the broker keeps the session
    assert client_id_for(label, None) == label  # an anonymous broker has nothing to bind it to
