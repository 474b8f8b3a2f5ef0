"""The control plane keeps a private Mosquitto's password file in step with enrolled devices."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from control_plane.api.main import create_app
from control_plane.config import Settings
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import MqttConnectError
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess, mosquitto_binary
from tests.support.simulated import SimDevice, sim_config
from tests.support.waiting import wait_for
from tests.test_rollouts import _token

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.mark.mosquitto
def test_enrollment_and_reissue_update_the_broker(tmp_path, db_url, engine):  # type: ignore[no-untyped-def]
    topics = Topics(f"slmops-test/{uuid.uuid4().hex[:8]}")
    broker = MosquittoProcess(tmp_path / "broker", topics=topics)
    broker.start(devices={})
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=broker.admin_url,
        mqtt_topic_prefix=topics.prefix,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:6]}",
        mqtt_password_file=broker.credentials.path,
        mqtt_pid_file=broker.pid_file,
        controller_tick_s=0.2,
    )
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            admin = _token(engine, "admin")
            created = client.post("/v1/devices", json={"name": "gw-1"}, headers=admin).json()
            cred = client.post("/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"]}).json()
            assert cred["mqtt_url"] == f"mqtt://127.0.0.1:{broker.port}"  # no control-plane password leaked
            device = SimDevice(broker.url(), topics, cred["device_id"], cred["device_secret"], sim_config())
            device.start(wait=False)  # refused until the broker has read the new password file; it retries
            wait_for(lambda: device.connected, timeout_s=10, what="the broker to accept the new device")
            wait_for(
                lambda: client.get(f"/v1/devices/{cred['device_id']}", headers=admin).json()["status"] == "online",
                what="the control plane to see it online",
            )
            device.stop()
            wrong = MqttClient(broker.url(cred["device_id"], "not-the-secret"), client_id="intruder")
            with pytest.raises(MqttConnectError):
                wrong.start(timeout_s=5)
            assert client.post(f"/v1/devices/{cred['device_id']}/enrollment-token", headers=admin).status_code == 201
            revoked = MqttClient(broker.url(cred["device_id"], cred["device_secret"]), client_id="old-cred")
            with pytest.raises(MqttConnectError):
                wait_for(lambda: revoked.start(timeout_s=2) and False, timeout_s=6, what="refusal")
    finally:
        broker.stop()
        with engine.begin() as conn:
            for table in reversed(SQLModel.metadata.sorted_tables):
                conn.execute(table.delete())
