"""Device isolation and credential sync on a private real Mosquitto, and on the embedded broker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control_plane.fleet.broker import EmbeddedBroker
from control_plane.fleet.credentials import (
    InMemoryCredentials,
    MosquittoPasswordFile,
    mosquitto_hash,
    verify_mosquitto_hash,
)
from control_plane.fleet.mosquitto_config import CONTROL_PLANE_USER, render_acl
from shared.mqtt.errors import MqttConnectError
from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import (
    DEPLOY_MOSQUITTO,
    WAIT_S,
    ClientFactory,
    Collector,
    RawClient,
    clients,
    private_mosquitto,
    shipped_mosquitto,
    unique_topics,
)
from tests.support.waiting import wait_for

__all__ = ["clients", "private_mosquitto"]  # fixtures

DEVICES = {"dev-a": "secret-a", "dev-b": "secret-b"}


def _prove_isolation(topics: Topics, url_for: dict[str, str], clients: ClientFactory) -> None:
    """A cannot publish as B nor read B's desired state; B and the control plane work normally."""
    control_plane_sees = Collector()
    control_plane = clients(url_for["cp"])
    control_plane.subscribe(topics.all_device_messages(), control_plane_sees)
    device_a = clients(url_for["dev-a"], client_id="dev-a")
    device_b = clients(url_for["dev-b"], client_id="dev-b")
    a_sees, b_sees = Collector(), Collector()
    device_a.subscribe(topics.desired("dev-b"), a_sees, timeout_s=10)  # refused or filtered by the broker
    device_a.subscribe(topics.all_devices("desired"), a_sees, timeout_s=10)
    device_b.subscribe(topics.desired("dev-b"), b_sees)

    # Brokers drop an unauthorised v3.1.1 publish silently, still with a PUBACK (3.1.1 cannot say no).
    device_a.publish(topics.state("dev-b"), b"forged by a")
    device_a.publish(topics.desired("dev-a"), b"a writing its own desired state")
    device_a.publish(topics.state("dev-a"), b"a's own state")
    control_plane.publish(topics.desired("dev-b"), b"for b only")

    assert b_sees.wait_for(1) == [b"for b only"]
    assert control_plane_sees.wait_for(1, topics.state("dev-a")) == [b"a's own state"]
    # The broker processes each connection's packets in order: b's and a's later messages arrived,
    # so the forged ones were dropped, not late. One more round trip through A makes it certain.
    device_a.publish(topics.events("dev-a"), b"marker")
    assert control_plane_sees.wait_for(1, topics.events("dev-a")) == [b"marker"]
    assert control_plane_sees.payloads(topics.state("dev-b")) == []
    assert control_plane_sees.payloads(topics.desired("dev-a")) == []
    assert a_sees.payloads() == []


def test_device_a_cannot_touch_device_b_on_mosquitto(
    private_mosquitto: MosquittoProcess, clients: ClientFactory
) -> None:
    private_mosquitto.start(DEVICES)
    urls = {name: private_mosquitto.url(name, secret) for name, secret in DEVICES.items()}
    urls["cp"] = private_mosquitto.admin_url
    _prove_isolation(private_mosquitto.topics, urls, clients)


def _embedded_broker(topics: Topics) -> EmbeddedBroker:
    """Started, with DEVICES and the control plane (password cp-secret) as its credentials."""
    credentials = InMemoryCredentials(admins={CONTROL_PLANE_USER: "cp-secret"})
    for device_id, secret in DEVICES.items():
        credentials.add_device(device_id, secret)
    broker = EmbeddedBroker(
        port=free_port(), auth=credentials.check, topics=topics, admin_users=frozenset({CONTROL_PLANE_USER})
    )
    broker.start()
    return broker


def test_device_a_cannot_touch_device_b_on_the_embedded_broker(clients: ClientFactory) -> None:
    topics = unique_topics()
    broker = _embedded_broker(topics)
    try:
        port = broker.port
        urls = {name: f"mqtt://{name}:{secret}@127.0.0.1:{port}" for name, secret in DEVICES.items()}
        urls["cp"] = f"mqtt://{CONTROL_PLANE_USER}:cp-secret@127.0.0.1:{port}"
        device_a = clients(urls["dev-a"], client_id="dev-a")
        # amqtt answers a refused subscription with SUBACK 0x80.
        result = device_a.subscribe(topics.desired("dev-b"), Collector())
        assert result is not None and result.granted == {topics.desired("dev-b"): None}
        device_a.stop(publish_offline=False)
        with pytest.raises(MqttConnectError):
            clients(f"mqtt://127.0.0.1:{port}")  # anonymous
        _prove_isolation(topics, urls, clients)
    finally:
        broker.stop()


def test_enrolled_device_connects_and_removed_device_is_cut_off_after_reload(
    private_mosquitto: MosquittoProcess, clients: ClientFactory
) -> None:
    private_mosquitto.start({"dev-a": "secret-a"})
    device_a = clients(private_mosquitto.url("dev-a", "secret-a"), reconnect_min_delay_s=1)
    with pytest.raises(MqttConnectError, match="refused"):
        clients(private_mosquitto.url("dev-new", "fresh"))
    private_mosquitto.credentials.add_device("dev-new", "fresh")  # file rewritten, then SIGHUP
    wait_for(lambda: _can_connect(clients, private_mosquitto.url("dev-new", "fresh")))
    private_mosquitto.credentials.remove_device("dev-a")
    # Mosquitto 2 re-checks connected clients on reload: the removed device is disconnected
    # and its reconnects are refused.
    wait_for(lambda: not device_a.connected and device_a.last_refusal is not None)
    assert not _can_connect(clients, private_mosquitto.url("dev-a", "secret-a"))
    assert "dev-a" not in private_mosquitto.credentials.read()


def _can_connect(clients: ClientFactory, url: str) -> bool:
    try:
        clients(url)
    except MqttConnectError:
        return False
    return True


def test_password_file_matches_mosquitto_passwd(tmp_path: Path) -> None:
    """Our `$7$` hashes verify mosquitto_passwd's and the reverse (same PBKDF2-SHA512 layout)."""
    reference = tmp_path / "reference"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(reference), "dev-a", "s3cret"], check=True)
    theirs = reference.read_text().strip().split(":", 1)[1]
    assert verify_mosquitto_hash("s3cret", theirs)
    assert not verify_mosquitto_hash("wrong", theirs)
    ours = mosquitto_hash("s3cret")
    assert ours.startswith("$7$101$") and verify_mosquitto_hash("s3cret", ours)


def test_sync_writes_exactly_the_given_devices_plus_admins_and_signals(tmp_path: Path) -> None:
    # Stands in for mosquitto: SIGHUP ends it. It restores SIGHUP's default action itself, since a
    # parent started under nohup passes SIGHUP down as ignored.
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); time.sleep(60)"]
    )
    time.sleep(0.5)  # let it install the handler before the signal is sent
    try:
        pid_file = tmp_path / "broker.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        passwd = MosquittoPasswordFile(tmp_path / "passwd", admins={"cp": "x"}, pid_file=pid_file)
        passwd.path.write_text("stale-device:$7$101$AAAA$BBBB\n")
        os.chmod(passwd.path, 0o640)
        passwd.sync({"dev-1": mosquitto_hash("one")})
        lines = passwd.path.read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == ["dev-1", "cp"]
        assert passwd.path.stat().st_mode & 0o777 == 0o640, "permissions kept across the atomic rename"
        wait_for(lambda: sleeper.poll() is not None, what="SIGHUP reached the pid in the pid file")
        assert sleeper.returncode == -signal.SIGHUP
    finally:
        sleeper.kill()
        sleeper.wait()


def test_shipped_acl_is_the_rendered_default() -> None:
    shipped = Path(__file__).parents[1] / "deploy" / "mosquitto" / "acl"
    assert shipped.read_text() == render_acl(Topics())


def test_shipped_production_config_runs_and_isolates(tmp_path: Path, clients: ClientFactory) -> None:
    """deploy/mosquitto/mosquitto.conf, with paths moved into tmp_path and TLS left out, starts
    Mosquitto with the shipped ACL in force on its device listener."""
    broker, device_port = shipped_mosquitto(tmp_path)
    try:
        broker.start({"dev-a": "secret-a"})
        shutil.copy(DEPLOY_MOSQUITTO / "acl", tmp_path / "acl")  # start() wrote an ACL; use the shipped one
        broker.credentials.reload()
        seen = Collector()
        clients(broker.admin_url).subscribe(Topics().all_devices("state"), seen)
        device_a = clients(f"mqtt://dev-a:secret-a@127.0.0.1:{device_port}", client_id="dev-a")
        device_a.publish(Topics().state("dev-b"), b"forged")
        device_a.publish(Topics().state("dev-a"), b"own")
        assert seen.wait_for(1) == [b"own"]
        assert seen.payloads() == [b"own"]
    finally:
        broker.stop()


def test_the_control_plane_ingests_through_a_secret_shared_subscription_under_the_acl(
    private_mosquitto: MosquittoProcess, clients: ClientFactory
) -> None:
    """SLMOPS_MQTT_INGEST_GROUP's `$share/` filter passes the production ACL. Mosquitto picks a
    group member before it checks the member may read, so a device in the same group would divert
    messages: the group name is a secret (checked in Settings), and a device guessing another name
    only forms a group of its own, which the ACL gives nothing."""
    private_mosquitto.start(DEVICES)
    topics = private_mosquitto.topics
    seen, guessed = Collector(), Collector()
    secret_group = "3f9c2a7be41d08c6a5f1e2d3c4b5a697"
    clients(private_mosquitto.admin_url).subscribe(f"$share/{secret_group}/{topics.all_devices('telemetry')}", seen)
    clients(private_mosquitto.url("dev-b", DEVICES["dev-b"]), client_id="dev-b").subscribe(
        f"$share/ingest/{topics.all_devices('telemetry')}", guessed, timeout_s=10
    )
    device_a = clients(private_mosquitto.url("dev-a", DEVICES["dev-a"]), client_id="dev-a")
    for i in range(4):
        device_a.publish(topics.telemetry("dev-a"), f"w{i}".encode())
    assert seen.wait_for(4) == [b"w0", b"w1", b"w2", b"w3"]  # the control plane got every window
    assert guessed.payloads() == []  # delivered at the same time as the control plane's copies, had it had any


def test_the_embedded_broker_refuses_a_connect_naming_another_clients_session(clients: ClientFactory) -> None:
    """amqtt looks a CONNECT's session up before it authenticates; ours refuses first, so neither a
    wrong password nor another identity's client id can end or adopt a session."""
    topics = unique_topics()
    broker = _embedded_broker(topics)
    try:
        url = f"mqtt://{{}}@127.0.0.1:{broker.port}".format
        seen = Collector()
        control_plane = clients(url(f"{CONTROL_PLANE_USER}:cp-secret"), client_id="cp-ingest", persistent_session=True)
        control_plane.subscribe(topics.all_device_messages(), seen)
        for credential, client_id, persistent in [
            ("dev-a:wrong", "cp-ingest", False),  # amqtt deleted the session, then refused the client
            ("dev-a:secret-a", "cp-ingest", True),  # amqtt adopted the session, username and all
            ("dev-a:secret-a", "dev-b", False),
        ]:
            with pytest.raises(MqttConnectError, match="refused"):
                clients(url(credential), client_id=client_id, persistent_session=persistent)
        device_b = clients(url("dev-b:secret-b"), client_id="dev-b")
        device_b.publish(topics.state("dev-b"), b"b's state")
        assert seen.wait_for(1) == [b"b's state"]
        assert control_plane.connected
    finally:
        broker.stop()


def test_a_second_connection_under_one_client_id_closes_the_first_on_the_embedded_broker() -> None:
    """MQTT 3.1.1 [MQTT-3.1.4-2]: amqtt left the first connection running, unreachable by client id,
    so closing a revoked device's connection could miss one it had opened before."""
    broker = _embedded_broker(unique_topics())
    url = f"mqtt://dev-a:secret-a@127.0.0.1:{broker.port}"
    first = second = None
    try:
        first = RawClient(url, "dev-a", clean_session=True)
        second = RawClient(url, "dev-a", clean_session=True)
        assert first.accepted and second.accepted
        assert first.closed.wait(WAIT_S)
        assert broker.disconnect("dev-a")
        assert second.closed.wait(WAIT_S)
    finally:
        for client in (first, second):
            if client is not None:
                client.close()
        broker.stop()


def test_a_devices_last_will_reaches_only_its_own_topics_on_the_embedded_broker(clients: ClientFactory) -> None:
    """amqtt 0.12 sends a will without the PUBLISH check, so the CONNECT carrying it is checked
    instead: a will on another device's topic is refused (CONNACK 0x05), one on its own status works."""
    topics = unique_topics()
    broker = _embedded_broker(topics)
    url = f"mqtt://dev-a:secret-a@127.0.0.1:{broker.port}"
    try:
        seen, b_sees = Collector(), Collector()
        control_plane = clients(f"mqtt://{CONTROL_PLANE_USER}:cp-secret@127.0.0.1:{broker.port}")
        control_plane.subscribe(topics.all_device_messages(), seen)
        device_b = clients(f"mqtt://dev-b:secret-b@127.0.0.1:{broker.port}", client_id="dev-b")
        device_b.subscribe(topics.desired("dev-b"), b_sees)
        for kind in ("desired", "state", "telemetry", "events", "status"):
            forger = RawClient(url, "dev-a", clean_session=True, will=(topics.device("dev-b", kind), b"forged"))
            forger.drop()
            assert not forger.accepted, kind
        # Each clean CONNECT under dev-a closes the one before it (its will queued first).
        own = RawClient(url, "dev-a", clean_session=True, will=(topics.status("dev-a"), b"offline"))
        assert own.accepted
        own.drop()
        assert seen.wait_for(1, topics.status("dev-a")) == [b"offline"]
        assert [topic for topic, _ in seen.items if "/dev-b/" in topic] == []
        assert b_sees.payloads() == []
    finally:
        broker.stop()
