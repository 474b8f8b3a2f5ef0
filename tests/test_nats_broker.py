"""The NATS broker tier: device users kept by the control plane, and clients failing over between nodes.

Real `nats-server` processes (three, clustered with JetStream, MQTT listeners) on free ports.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from control_plane.config import Settings
from control_plane.fleet.nats_users import (
    NatsUsersFile,
    is_nats_hash,
    mqtt_topic_to_subject,
    nats_hash,
    verify_nats_hash,
)
from edge_agent.settings import AgentSettings
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import BrokerURLError, CredentialSyncError, MqttConnectError
from shared.mqtt.url import format_broker_url, parse_broker_urls
from shared.topics import Topics
from tests.support.mqtt import ClientFactory, Collector, clients, unique_topics
from tests.support.nats import NATS_SERVER, NatsCluster, nats_available
from tests.support.waiting import wait_for

__all__ = ["clients"]  # fixtures
needs_nats = pytest.mark.skipif(not nats_available(), reason="nats-server is not installed")
RECOVERY_S = 60.0  # JetStream re-elects its leaders in 10-15 s; a ceiling only a broken failover reaches


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats", topics=unique_topics())
    nodes.start()
    yield nodes
    nodes.stop()


def test_several_broker_urls_share_one_credential() -> None:
    urls = parse_broker_urls("mqtt://cp:s%40cret@n1:1883, mqtt://n2:1884,mqtt://n3")
    assert [(u.host, u.port, u.username, u.password) for u in urls] == [
        ("n1", 1883, "cp", "s@cret"),
        ("n2", 1884, "cp", "s@cret"),
        ("n3", 1883, "cp", "s@cret"),
    ]
    assert format_broker_url(urls[0]) == "mqtt://cp:s%40cret@n1:1883"
    with pytest.raises(BrokerURLError):
        parse_broker_urls("mqtt://n1,mqtts://n2")
    with pytest.raises(BrokerURLError):
        parse_broker_urls("mqtt://a:1@n1,mqtt://b:2@n2")
    with pytest.raises(BrokerURLError):
        parse_broker_urls(" , ")


def test_clients_spread_over_the_nodes() -> None:
    starts = {MqttClient("mqtt://n1,mqtt://n2,mqtt://n3", client_id=f"dev-{i}").url.host for i in range(30)}
    assert starts == {"n1", "n2", "n3"}


def test_users_file_holds_bcrypt_hashes_only(tmp_path: Path) -> None:
    users = NatsUsersFile(tmp_path / "users.conf", topics=Topics("t/v1"), admins={"cp": "admin-secret"})
    password_hash = users.add_device("dev-1", "device-secret")
    body = users.path.read_text()
    assert is_nats_hash(password_hash) and verify_nats_hash("device-secret", password_hash)
    assert "device-secret" not in body and "admin-secret" not in body
    assert users.read() == {"dev-1": password_hash}
    # NATS would take a Mosquitto hash for the password itself: such an entry is refused.
    with pytest.raises(CredentialSyncError):
        users.add_hash("dev-2", "$7$101$c2FsdA==$ZGVyaXZlZA==")
    with pytest.raises(CredentialSyncError):
        users.add_hash("dev.3", nats_hash("x"))  # a dot would split the device's subject
    assert mqtt_topic_to_subject("a/+/c/#") == "a.*.c.>"


@needs_nats
def test_devices_reach_only_their_own_subjects(cluster: NatsCluster, clients: ClientFactory) -> None:
    topics = cluster.topics
    cluster.users.add_device("dev-1", "secret-1")
    cluster.users.add_device("dev-2", "secret-2")
    control = clients(cluster.url(0, cluster.admin_user, cluster.admin_secret), client_id="cp")
    seen = Collector()
    control.subscribe(topics.all_devices("state"), seen)

    device = clients(cluster.url(1, "dev-1", "secret-1"), client_id="dev-1")
    inbox = Collector()
    own = device.subscribe(topics.desired("dev-1"), inbox)
    other = device.subscribe(topics.desired("dev-2"), inbox)
    assert own is not None and own.all_granted
    assert other is not None and not other.all_granted

    device.publish(topics.state("dev-2"), b"forged")  # acknowledged, but NATS drops it
    device.publish(topics.state("dev-1"), b"mine")
    assert seen.wait_for(1) == [b"mine"]
    control.publish(topics.desired("dev-2"), b"for dev-2", retain=True)
    control.publish(topics.desired("dev-1"), b"for dev-1", retain=True)
    assert inbox.wait_for(1) == [b"for dev-1"]
    time.sleep(0.5)
    assert seen.payloads() == [b"mine"] and inbox.payloads() == [b"for dev-1"]

    with pytest.raises(MqttConnectError):
        clients(cluster.url(2, "dev-1", "wrong"), client_id="dev-1-bad", start=False).start(timeout_s=5)
    # Over the NATS protocol a device could read every client's deliveries: it may not connect.
    assert "Authorization Violation" in _nats_protocol_connect(cluster.nodes[0].client_port, "dev-1", "secret-1")


@needs_nats
def test_removed_devices_are_cut_off_and_the_nodes_survive_the_reload(
    cluster: NatsCluster, clients: ClientFactory
) -> None:
    topics = cluster.topics
    control = clients(cluster.url(0, cluster.admin_user, cluster.admin_secret), client_id="cp")
    devices = []
    # Retained messages from both kinds of user, through every node: nats-server 2.9.10 crashed
    # on the reload over an admin's retained message when the admin had no permissions block,
    # and over a removed device's retained status when the device's user was dropped.
    for i in range(len(cluster.nodes)):
        device_id = f"dev-{i}"
        cluster.users.add_device(device_id, f"secret-{i}")
        control.publish(topics.desired(device_id), b"desired", retain=True)
        device = clients(cluster.url(i, device_id, f"secret-{i}"), client_id=device_id)
        device.publish(topics.status(device_id), b"online", retain=True)
        devices.append(device)

    for i in range(len(cluster.nodes)):
        cluster.users.remove_device(f"dev-{i}")
    wait_for(lambda: not any(device.connected for device in devices))
    time.sleep(1.0)  # a refused reconnect, had the reload failed, would have brought one back
    assert not any(device.connected for device in devices)
    assert all(node.alive for node in cluster.nodes)
    with pytest.raises(MqttConnectError):
        clients(cluster.url(2, "dev-0", "secret-0"), client_id="dev-0-again", start=False).start(timeout_s=5)
    late = Collector()
    clients(cluster.url(2, cluster.admin_user, cluster.admin_secret), client_id="cp-late").subscribe(
        topics.desired("dev-0"), late
    )
    assert late.wait_for(1) == [b"desired"]


@needs_nats
def test_a_client_fails_over_to_another_node_and_resubscribes(cluster: NatsCluster, clients: ClientFactory) -> None:
    topics = cluster.topics
    cluster.users.add_device("dev-1", "secret-1")
    device = clients(cluster.urls("dev-1", "secret-1"), client_id="dev-1", reconnect_max_delay_s=2)
    inbox = Collector()
    device.subscribe(topics.desired("dev-1"), inbox)
    on = next(i for i, node in enumerate(cluster.nodes) if node.mqtt_port == device.url.port)
    publisher_node = (on + 1) % len(cluster.nodes)
    control = clients(
        cluster.url(publisher_node, cluster.admin_user, cluster.admin_secret), client_id="cp", reconnect_max_delay_s=2
    )
    control.publish(topics.desired("dev-1"), b"v1", retain=True)
    assert inbox.wait_for(1) == [b"v1"]

    cluster.kill(on)
    wait_for(lambda: device.connected and device.url.port != cluster.nodes[on].mqtt_port, RECOVERY_S)
    wait_for(lambda: _publish(control, topics.desired("dev-1"), b"v2"), RECOVERY_S)
    wait_for(lambda: b"v2" in inbox.payloads(), RECOVERY_S)
    assert device.counters.connects >= 2


def _publish(client: MqttClient, topic: str, payload: bytes) -> bool:
    """One attempt; False while the cluster is still electing leaders."""
    try:
        client.publish(topic, payload, retain=True, timeout_s=5)
    except Exception:
        return False
    return True


def _nats_protocol_connect(port: int, user: str, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(f'CONNECT {{"user":"{user}","pass":"{password}","verbose":true}}\r\nPING\r\n'.encode())
        time.sleep(0.3)
        return sock.recv(4096).decode(errors="replace")


@needs_nats
def test_the_deploy_configuration_is_valid() -> None:
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "nats"
    for node in ("nats-1.conf", "nats-2.conf", "nats-3.conf"):
        checked = subprocess.run([NATS_SERVER, "-t", "-c", str(deploy / node)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_settings_take_a_cluster_and_refuse_what_nats_lacks(tmp_path: Path) -> None:
    urls = "mqtt://cp:pw@127.0.0.1:1891,mqtt://127.0.0.1:1892"
    settings = Settings(mqtt_url=urls, nats_users_file=tmp_path / "users.conf", nats_pid_files="/run/a.pid, /run/b.pid")
    assert settings.nats_pid_files == (Path("/run/a.pid"), Path("/run/b.pid"))
    with pytest.raises(ValidationError, match="shared subscriptions"):
        Settings(mqtt_url=urls, nats_users_file=tmp_path / "u", mqtt_ingest_group="g" * 16)
    with pytest.raises(ValidationError, match="3.1.1"):
        Settings(mqtt_url=urls, nats_users_file=tmp_path / "u", mqtt_protocol="5")
    with pytest.raises(ValidationError):
        Settings(mqtt_url="mqtt://n1,mqtts://n2")
    agent = AgentSettings(mqtt_url="mqtt://127.0.0.1:1891,mqtt://127.0.0.1:1892")
    assert agent.mqtt_url is not None
    with pytest.raises(ValidationError, match="in clear"):
        AgentSettings(mqtt_url="mqtt://127.0.0.1:1891,mqtt://nats-2.example.com:1892")
