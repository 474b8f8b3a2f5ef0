"""MQTT over TLS: the shipped Mosquitto listeners and the embedded broker, with test-made certificates.

Devices and the control plane connect with `mqtts://` and verify the broker against the CA file
they are given; a client that trusts only the system store is refused at the handshake.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.fleet.broker import EmbeddedBroker
from control_plane.models import DeviceEvent
from edge_agent.agent import Agent
from edge_agent.enroll import Credential
from edge_agent.mqtt.channel import MqttChannel
from edge_agent.settings import load_settings
from edge_agent.tls import ssl_context
from shared.messages import EventMessage, encode
from shared.mqtt.client import MqttClient
from shared.mqtt.url import parse_broker_url
from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import mosquitto_binary
from tests.support.mqtt import ClientFactory, Collector, clients, shipped_mosquitto
from tests.support.tls import Issued, TestCA
from tests.support.waiting import wait_for

__all__ = ["clients"]  # fixture


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def broker_cert(ca: TestCA) -> Issued:
    return ca.issue("broker")


def _handshake_refused(port: int) -> None:
    """A client trusting only the system store fails the TLS handshake on `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.mark.mosquitto
@needs_mosquitto
def test_agent_connects_to_the_shipped_tls_listener_with_its_ca_bundle(tmp_path, ca, broker_cert, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    broker, device_port = shipped_mosquitto(tmp_path / "broker", tls=(broker_cert.cert_file, broker_cert.key_file))
    broker.start(devices={"edge-1": "secret-edge-1"})
    admin = MqttClient(broker.admin_url, client_id=f"admin-{uuid.uuid4().hex[:6]}")
    try:
        _handshake_refused(device_port)
        statuses = Collector()
        admin.subscribe(Topics().status("edge-1"), statuses)
        admin.start()
        settings = load_settings(data_dir=tmp_path / "data", ca_bundle=str(ca.ca_file))
        credential = Credential(
            device_id="edge-1", device_secret="secret-edge-1", mqtt_url=f"mqtts://127.0.0.1:{device_port}"
        )
        settings.data_dir.mkdir(parents=True)
        settings.credential_path.write_text(credential.model_dump_json())
        agent = Agent(settings)
        agent.enroll()
        channel = MqttChannel.for_agent(agent)
        assert channel is not None and channel.device.client.url.tls
        channel.start(wait=True, timeout_s=15)
        try:
            assert channel.device.client.connected
            wait_for(lambda: any(b"online" in p for p in statuses.payloads()))  # its birth, over TLS
        finally:
            channel.stop()
            agent.stop()
    finally:
        admin.stop(publish_offline=False)
        broker.stop()


@contextmanager
def _fleet(kind: str, tmp_path: Path, db_url: str, cert: Issued, ca: TestCA) -> Iterator[Settings]:
    common = {"data_dir": tmp_path / "data", "database_url": db_url, "controller_tick_s": 0.2}
    if kind == "embedded":
        # The embedded broker serves devices over TLS with the server's own certificate.
        yield Settings(
            **common,
            tls_cert_file=cert.cert_file,
            tls_key_file=cert.key_file,
            mqtt_port=free_port(),
            mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:8]}",
        )
        return
    broker, device_port = shipped_mosquitto(
        tmp_path / "broker", tls=(cert.cert_file, cert.key_file), control_plane_tls=True
    )
    broker.start(devices={})
    try:
        yield Settings(
            **common,
            mqtt_url=broker.admin_url.replace("mqtt://", "mqtts://"),
            mqtt_ca_file=ca.ca_file,
            device_mqtt_url=f"mqtts://127.0.0.1:{device_port}",
            mqtt_password_file=broker.credentials.path,
            mqtt_pid_file=broker.pid_file,
        )
    finally:
        broker.stop()


def _events_stored(engine: sa.Engine, device_id: str) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).where(col(DeviceEvent.device_id) == device_id)).one())


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "embedded"])
def test_control_plane_and_devices_speak_mqtts(
    kind, tmp_path, db_url, empty_tables, admin_headers, ca, broker_cert, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Enrollment hands devices an mqtts:// URL; what a device sends over it reaches the registry
    through the control plane's own TLS connection, each side verifying the test CA."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with _fleet(kind, tmp_path, db_url, broker_cert, ca) as settings:
        with TestClient(create_app(settings, engine=empty_tables)) as client:
            created = client.post("/v1/devices", json={"name": "edge-tls"}, headers=admin_headers).json()
            cred = client.post("/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"]}).json()
            broker_url = parse_broker_url(cred["mqtt_url"])
            assert broker_url.tls, cred["mqtt_url"]
            _handshake_refused(broker_url.port)
            device = MqttClient(
                broker_url.with_credentials(cred["device_id"], cred["device_secret"]),
                client_id=cred["device_id"],
                tls_context=ssl_context(ca.ca_file),
            )
            device.start()
            try:
                topics = Topics(settings.mqtt_topic_prefix)
                device.publish(topics.events(cred["device_id"]), encode(EventMessage(kind="error", message="tls")))
                wait_for(lambda: _events_stored(empty_tables, cred["device_id"]) == 1)
            finally:
                device.stop(publish_offline=False)


def test_embedded_broker_tls_listener(tmp_path: Path, ca: TestCA, broker_cert: Issued, clients: ClientFactory) -> None:
    broker = EmbeddedBroker(port=free_port(), tls=(broker_cert.cert_file, broker_cert.key_file))
    with broker:
        assert broker.url.startswith("mqtts://")
        _handshake_refused(broker.port)
        seen = Collector()
        reader = clients(broker.url, tls_context=ssl_context(ca.ca_file))
        assert reader.subscribe("tls/check", seen) is not None  # connected, SUBACK received
        clients(broker.url, tls_context=ssl_context(ca.ca_file)).publish("tls/check", b"over tls")
        assert seen.wait_for(1) == [b"over tls"]
