"""Helpers for the MQTT tests: message collectors, waiting, unique prefixes, broker fixtures."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.fleet.broker import EmbeddedBroker
from shared.mqtt.client import MqttClient, Outgoing
from shared.mqtt.url import parse_broker_url
from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess
from tests.support.tls import Issued
from tests.support.waiting import wait_for

SYSTEM_MOSQUITTO = "mqtt://127.0.0.1:1883"
WAIT_S = 15.0  # a ceiling that only a broken feature reaches; nothing asserts on speed


def unique_topics() -> Topics:
    return Topics(f"slmops-test-{uuid.uuid4().hex[:10]}/v1")


class Collector:
    """A handler that records (topic, payload) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.items.append((topic, payload))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.items if topic is None or t == topic]

    def wait_for(self, count: int, topic: str | None = None) -> list[bytes]:
        """What arrived once `count` payloads have, or at the deadline: the caller's assertion then
        shows what was missing."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: len(self.payloads(topic)) >= count, timeout_s=WAIT_S)
        return self.payloads(topic)


class ClientFactory:
    """Starts clients and stops them all at teardown."""

    def __init__(self) -> None:
        self.clients: list[MqttClient] = []

    def __call__(self, url: str, *, client_id: str | None = None, start: bool = True, **kwargs: object) -> MqttClient:
        client = MqttClient(url, client_id=client_id or f"test-{uuid.uuid4().hex[:10]}", **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        if start:
            client.start()
        return client

    def close(self) -> None:
        for client in self.clients:
            client.stop(publish_offline=False)


@pytest.fixture
def clients() -> Iterator[ClientFactory]:
    factory = ClientFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The system Mosquitto (a unique prefix per test keeps runs apart) and the embedded broker."""
    if request.param == "mosquitto":
        return SYSTEM_MOSQUITTO
    broker: EmbeddedBroker = request.getfixturevalue("embedded_broker")
    return broker.url


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """Our own Mosquitto with credentials and the device ACL, on a free port."""
    broker = MosquittoProcess(tmp_path / "mosquitto", topics=unique_topics())
    yield broker
    broker.stop()


def status_will(topics: Topics, device_id: str) -> tuple[Outgoing, Outgoing]:
    """(will, birth) as plain payloads, for tests that only look at bytes."""
    return (
        Outgoing(topics.status(device_id), b"offline", qos=1, retain=True),
        Outgoing(topics.status(device_id), b"online", qos=1, retain=True),
    )


def clear_retained(client: MqttClient, topics: list[str]) -> None:
    """An empty retained payload deletes the retained message (MQTT 3.1.1 section 3.3.1.3)."""
    client.publish_many([Outgoing(topic, b"", retain=True) for topic in topics])


DEPLOY_MOSQUITTO = Path(__file__).parents[2] / "deploy" / "mosquitto"


def shipped_mosquitto(
    workdir: Path, *, tls: tuple[Path, Path] | None = None, control_plane_tls: bool = False, extra: str = ""
) -> tuple[MosquittoProcess, int]:
    """deploy/mosquitto/mosquitto.conf on free ports, paths moved into `workdir`: its control-plane
    listener (the process's `port`) and its device listener (the returned port), without TLS
    unless `tls` = (certificate, key); `control_plane_tls` puts TLS on the control plane's too."""
    import os
    import re

    port, device_port = free_port(), free_port()
    config = (DEPLOY_MOSQUITTO / "mosquitto.conf").read_text()
    if tls is None:
        config = re.sub(r"^(certfile|keyfile|tls_version) .*\n", "", config, flags=re.M)
    else:
        config = config.replace("/etc/mosquitto/certs/server.crt", str(tls[0]))
        config = config.replace("/etc/mosquitto/certs/server.key", str(tls[1]))
        if control_plane_tls:  # as documented for a control plane on another host
            own = f"certfile {tls[0]}\nkeyfile {tls[1]}\n"
            config = config.replace("listener 1883 127.0.0.1\n", f"listener 1883 127.0.0.1\n{own}")
    for production, test in [
        ("/etc/mosquitto/slmops/", f"{workdir}/"),
        ("/run/mosquitto/", f"{workdir}/"),
        ("/var/lib/mosquitto/", f"{workdir}/"),
        ("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"),
        ("listener 8883\n", f"listener {device_port} 127.0.0.1\n"),
        ("log_dest syslog", "log_dest stderr"),
    ]:
        assert production in config
        config = config.replace(production, test)
    config += extra
    if os.geteuid() == 0:
        config += "user root\n"  # mosquitto would switch to its own user, who cannot read workdir
    workdir.mkdir(parents=True, exist_ok=True)
    return MosquittoProcess(workdir, topics=Topics(), port=port, config=config), device_port


def mtls_mosquitto(workdir: Path, server: Issued, device_ca_dir: Path) -> tuple[MosquittoProcess, int, int]:
    """The shipped Mosquitto with deploy/mosquitto/mtls-listener.conf appended, on free ports:
    `server` = (certificate, key) for its TLS listeners, `device_ca_dir` the device CA's folder
    (`ca.crt`, `ca.crl`). Returns the broker, its TLS device listener's port and its mTLS one's."""
    mtls_port = free_port()
    listener = (DEPLOY_MOSQUITTO / "mtls-listener.conf").read_text()
    for production, test in [
        ("listener 8884", f"listener {mtls_port} 127.0.0.1"),
        ("/etc/mosquitto/certs/server.crt", str(server.cert_file)),
        ("/etc/mosquitto/certs/server.key", str(server.key_file)),
        ("/etc/mosquitto/slmops/device-ca.crt", str(device_ca_dir / "ca.crt")),
        ("/etc/mosquitto/slmops/device-ca.crl", str(device_ca_dir / "ca.crl")),
    ]:
        assert production in listener
        listener = listener.replace(production, test)
    broker, device_port = shipped_mosquitto(workdir, tls=(server.cert_file, server.key_file), extra=listener)
    return broker, device_port, mtls_port


class RawClient:
    """A bare paho client: one CONNECT, no reconnects, any client id and session flag."""

    def __init__(self, url: str, client_id: str, *, clean_session: bool, will: tuple[str, bytes] | None = None) -> None:
        parsed = parse_broker_url(url)
        self.answered = threading.Event()
        self.accepted = False
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        self.paho.username_pw_set(parsed.username, parsed.password)
        if will is not None:
            self.paho.will_set(will[0], will[1], qos=1)
        self.paho.on_connect = self._on_connect
        self.closed = threading.Event()
        self.paho.on_disconnect = self._on_disconnect
        self.paho.reconnect_delay_set(600, 600)
        self.paho.connect(parsed.host, parsed.port)
        self.paho.loop_start()
        self.answered.wait(10)

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.accepted = not getattr(reason, "is_failure", True)
        self.answered.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.closed.set()
        self.answered.set()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()

    def drop(self) -> None:
        """Close the socket without a DISCONNECT, so the broker sends the will (MQTT 3.1.1 section 3.1.2.5)."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        if sock is not None:
            sock.close()
