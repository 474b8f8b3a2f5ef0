"""The agent's MQTT channel with a real agent, real tiny GGUF models and real brokers.

In-process agents (the same `Agent` the daemon runs) for the desired-state flow, outages and the
spool; agent processes started by the daemon for the last will and the clean shutdown. A test
"control plane" is a plain MqttClient that publishes desired states and collects what the device
sends.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from control_plane.fleet.broker import EmbeddedBroker
from control_plane.fleet.ingest import status_rank
from shared.messages import StatusMessage, decode
from shared.net import free_port
from shared.topics import TopicKind, Topics
from slmops.tinymodels import write_tiny_gguf
from tests.support.agent import AgentProcess, ArtifactServer, desired_for
from tests.support.agent_mqtt import DEVICE, SECRET, ControlPlane, Device, serving, write_credential
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import (
    SYSTEM_MOSQUITTO,
    ClientFactory,
    Collector,
    broker_url,
    clients,
    embedded_broker,
    private_mosquitto,
    unique_topics,
)
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

__all__ = ["broker_url", "clients", "embedded_broker", "private_mosquitto"]  # fixtures

pytestmark = [pytest.mark.mosquitto]


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


@pytest.fixture(scope="module")
def model_sha(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    return artifacts.add_file(write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=31))


@pytest.fixture
def devices() -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(data_dir: Path, url: str, topics: Topics, artifacts: ArtifactServer, **options: Any) -> Device:
        device = Device(data_dir, url, topics, artifacts, **options)
        made.append(device)
        device.channel.start(wait=True)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def control_plane(broker_url: str, clients: ClientFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(clients(broker_url, protocol="3.1.1"), unique_topics())
    yield cp
    cp.clear()


# -- desired state in, state and events out --------------------------------------------------------


@pytest.mark.llama
def test_retained_desired_state_is_downloaded_activated_and_reported(
    control_plane: ControlPlane, broker_url: str, devices, artifacts, model_sha, tmp_path
) -> None:
    desired = desired_for(artifacts, model_sha, version="1", message_id="want-v1")
    control_plane.publish_desired(desired)  # retained before the device exists, as after enrollment

    device = devices(tmp_path / "data", broker_url, control_plane.topics, artifacts)

    final = control_plane.wait_state(serving("1"))
    assert final.current is not None and final.current.sha256 == model_sha
    assert final.device_id == DEVICE and final.desired_message_id == "want-v1" and final.serving
    phases = [s.phase for s in control_plane.states()]
    assert phases.index("downloading") < phases.index("activating") < phases.index("on_trial")
    assert device.agent.ready
    births = [s for s in control_plane.received(TopicKind.STATUS) if s.status == "online"]
    assert births and births[0].hardware is not None and births[0].hardware.ram_mb > 0
    assert births[0].agent_version
    wait_for(lambda: len(control_plane.events("activation_succeeded")) == 1)
    kinds = [e.kind for e in control_plane.events() if e.kind != "download_progress"]
    assert kinds == ["download_started", "download_completed", "activation_started", "activation_succeeded"]
    last_progress = control_plane.events("download_progress")[-1]
    assert last_progress.bytes_done == last_progress.bytes_total == len(artifacts.files[model_sha])
    assert device.channel.counters.desired_received == 1
    # "auto" speaks MQTT v5 where the broker does (Mosquitto 2) and 3.1.1 elsewhere (amqtt).
    expected = MQTTProtocolVersion.MQTTv5 if broker_url == SYSTEM_MOSQUITTO else MQTTProtocolVersion.MQTTv311
    assert device.channel.device.client.protocol == expected


@pytest.mark.llama
def test_duplicated_desired_state_is_applied_once(
    control_plane: ControlPlane, broker_url: str, devices, artifacts, model_sha, tmp_path
) -> None:
    desired = desired_for(artifacts, model_sha, version="1", message_id="dup-v1")
    downloads_before = len(artifacts.ranges_for(model_sha))
    control_plane.publish_desired(desired)
    device = devices(tmp_path / "data", broker_url, control_plane.topics, artifacts)
    control_plane.wait_state(serving("1"))  # also proves the device is subscribed
    for _ in range(2):  # the same message id again: what a QoS 1 redelivery looks like
        control_plane.publish_desired(desired)
    # Same artifact, new message id: once it shows, every earlier delivery has been handled.
    control_plane.publish_desired(desired.model_copy(update={"message_id": "dup-v1b", "version": "1b"}))

    control_plane.wait_state(lambda s: s.desired_message_id == "dup-v1b")
    assert device.channel.counters.desired_received == 2
    # At least our two; a broker may add its own redelivery (amqtt resends a slow-acked QoS 1 message).
    assert device.channel.counters.desired_duplicates >= 2
    assert len(artifacts.ranges_for(model_sha)) == downloads_before + 1
    downloading = [s for s in control_plane.states() if s.phase == "downloading"]
    assert [s.desired_message_id for s in downloading] == ["dup-v1"]
    assert len(control_plane.events("activation_succeeded")) == 1


@pytest.mark.llama
def test_malformed_desired_state_is_counted_reported_and_dropped(
    control_plane: ControlPlane, broker_url: str, devices, artifacts, model_sha, tmp_path
) -> None:
    control_plane.publish_desired(desired_for(artifacts, model_sha, version="1", message_id="before-junk"))
    device = devices(tmp_path / "data", broker_url, control_plane.topics, artifacts)
    control_plane.wait_state(serving("1"))  # subscribed: what follows reaches the device live
    control_plane.publish_desired(b"{not json", retain=False)
    control_plane.publish_desired(json.dumps({"message_id": "x", "model": "tiny"}).encode(), retain=False)
    control_plane.publish_desired(desired_for(artifacts, model_sha, version="2", message_id="after-junk"))

    control_plane.wait_state(serving("2"))  # the agent survived and still follows its desired topic
    assert device.channel.counters.desired_malformed == 2
    wait_for(lambda: len(control_plane.events("error")) == 2)
    reasons = [e.detail["reason"] for e in control_plane.events("error")]
    assert reasons == ["malformed_json", "invalid"]
    assert device.channel.counters.desired_received == 2


# -- telemetry through broker outages ---------------------------------------------------------------


@pytest.fixture
def outage_control_plane(private_mosquitto: MosquittoProcess, clients: ClientFactory) -> ControlPlane:
    """On our own Mosquitto with the device ACL; a persistent session, so the broker keeps what the
    device sends while the control plane itself is still reconnecting after a broker restart."""
    private_mosquitto.start({DEVICE: SECRET})
    client = clients(
        private_mosquitto.admin_url,
        client_id="cp-outage",
        persistent_session=True,
        protocol="3.1.1",
        reconnect_min_delay_s=1,
        reconnect_max_delay_s=2,
    )
    return ControlPlane(client, private_mosquitto.topics)


def seqs(control_plane: ControlPlane) -> list[int]:
    return [t.seq for t in control_plane.telemetry()]


def emit_while_down(device: Device, count: int, spooled: int, dropped: int = 0) -> None:
    for _ in range(count):
        device.agent.emit_telemetry()
    spool = device.channel.spool
    wait_for(lambda: (len(spool), spool.dropped_total) == (spooled, dropped))


def test_telemetry_produced_during_a_broker_outage_arrives_after_it_in_order(
    outage_control_plane: ControlPlane, private_mosquitto: MosquittoProcess, devices, artifacts, tmp_path
) -> None:
    cp = outage_control_plane
    device = devices(tmp_path / "data", private_mosquitto.url(), cp.topics, artifacts)
    device.agent.emit_telemetry()
    wait_for(lambda: seqs(cp) == [0])

    private_mosquitto.stop()
    wait_for(lambda: not device.channel.connected)
    emit_while_down(device, 5, spooled=5)
    private_mosquitto.start()

    wait_for(lambda: len(seqs(cp)) >= 6, what=lambda: seqs(cp))
    assert seqs(cp) == [0, 1, 2, 3, 4, 5]
    assert all(t.dropped_windows == 0 and t.device_id == DEVICE for t in cp.telemetry())
    assert len(device.channel.spool) == 0
    # The reconnect restored the desired subscription: the device still hears its desired topic.
    cp.publish_desired(b"[]")  # retained: arrives once, whether before or after the resubscription
    wait_for(lambda: device.channel.counters.desired_malformed == 1)


def test_telemetry_survives_an_embedded_broker_restart(clients: ClientFactory, devices, artifacts, tmp_path) -> None:
    """The same outage on the embedded broker. amqtt keeps no sessions across a restart, so the
    device is refused until a fresh control-plane subscriber is in place: nothing can race it."""
    topics, port, device_admitted = unique_topics(), free_port(), threading.Event()
    device_admitted.set()

    def check(username: str, password: str) -> bool:
        return username == "cp" or (device_admitted.is_set() and (username, password) == (DEVICE, SECRET))

    def start_broker() -> EmbeddedBroker:
        broker = EmbeddedBroker(port=port, auth=check, topics=topics, admin_users=frozenset({"cp"}))
        broker.start()
        return broker

    broker = start_broker()
    try:
        before = ControlPlane(clients(f"mqtt://cp:x@127.0.0.1:{port}", protocol="3.1.1"), topics)
        device = devices(tmp_path / "data", f"mqtt://127.0.0.1:{port}", topics, artifacts, protocol="3.1.1")
        device.agent.emit_telemetry()
        wait_for(lambda: seqs(before) == [0])

        broker.stop()
        wait_for(lambda: not device.channel.connected)
        device_admitted.clear()
        emit_while_down(device, 5, spooled=5)
        broker = start_broker()
        after = ControlPlane(clients(f"mqtt://cp:x@127.0.0.1:{port}", protocol="3.1.1"), topics)
        device_admitted.set()

        wait_for(lambda: len(seqs(after)) >= 5, what=lambda: seqs(after))
        assert seqs(after) == [1, 2, 3, 4, 5]
        assert len(device.channel.spool) == 0
    finally:
        broker.stop()


def test_spool_bound_drops_the_oldest_windows_and_reports_the_count(
    outage_control_plane: ControlPlane, private_mosquitto: MosquittoProcess, devices, artifacts, tmp_path
) -> None:
    cp = outage_control_plane
    device = devices(tmp_path / "data", private_mosquitto.url(), cp.topics, artifacts, spool_max_messages=3)
    device.agent.emit_telemetry()
    wait_for(lambda: seqs(cp) == [0])

    private_mosquitto.stop()
    wait_for(lambda: not device.channel.connected)
    emit_while_down(device, 5, spooled=3, dropped=2)  # windows 1..5; only 3..5 fit
    private_mosquitto.start()

    wait_for(lambda: len(seqs(cp)) >= 4, what=lambda: seqs(cp))
    device.agent.emit_telemetry()  # the next window carries whatever drop count is still unreported
    wait_for(lambda: len(seqs(cp)) >= 5, what=lambda: seqs(cp))
    assert seqs(cp) == [0, 3, 4, 5, 6]
    assert sum(t.dropped_windows for t in cp.telemetry()) == 2


@pytest.mark.llama
def test_a_swap_made_while_offline_is_reported_after_reconnect(
    outage_control_plane: ControlPlane, private_mosquitto: MosquittoProcess, devices, artifacts, model_sha, tmp_path
) -> None:
    cp = outage_control_plane
    device = devices(tmp_path / "data", private_mosquitto.url(), cp.topics, artifacts)
    cp.wait_state(lambda s: s.phase == "idle")
    private_mosquitto.stop()
    wait_for(lambda: not device.channel.connected)

    # The watched file feeds the same reconcile loop: a desired state can arrive without MQTT.
    offline = desired_for(artifacts, model_sha, version="7", message_id="offline-v7")
    device.agent.submit_desired(offline).result(timeout=60)
    swap = ["download_started", "download_completed", "activation_started", "activation_succeeded"]
    wait_for(lambda: len(device.channel.spool) == len(swap))
    private_mosquitto.start()

    final = cp.wait_state(serving("7"))  # the latest state, republished on connect
    assert final.desired_message_id == "offline-v7"
    wait_for(lambda: len(cp.events()) >= len(swap))
    assert [e.kind for e in cp.events()] == swap  # from the spool, in order
    assert device.channel.counters.events_dropped_offline >= 1  # progress is not worth spooling


def test_spooled_telemetry_survives_an_agent_restart(
    outage_control_plane: ControlPlane, private_mosquitto: MosquittoProcess, devices, artifacts, tmp_path
) -> None:
    cp = outage_control_plane
    private_mosquitto.stop()
    first = Device(tmp_path / "data", private_mosquitto.url(), cp.topics, artifacts)
    first.channel.start(wait=False)
    try:
        emit_while_down(first, 3, spooled=3)
    finally:
        first.close()

    private_mosquitto.start()
    devices(tmp_path / "data", private_mosquitto.url(), cp.topics, artifacts)
    wait_for(lambda: len(seqs(cp)) >= 3, what=lambda: seqs(cp))
    assert seqs(cp) == [0, 1, 2]


# -- the daemon: last will and clean shutdown -------------------------------------------------------


def start_agent_process(tmp_path: Path, url: str, topics: Topics, *, from_enrollment: bool) -> AgentProcess:
    """The broker URL comes from the enrollment answer (kept in the credential) or from settings."""
    data_dir = tmp_path / "data"
    write_credential(data_dir, topics, mqtt_url=url if from_enrollment else None)
    settings = {} if from_enrollment else {"mqtt_url": url}
    return AgentProcess(data_dir, telemetry_window_s=0.2, **settings).start()


def statuses(cp: ControlPlane) -> list[StatusMessage]:
    return cp.received(TopicKind.STATUS)


def retained_status(url: str, topics: Topics, clients: ClientFactory) -> StatusMessage:
    """What a client that connects now reads on the status topic: the retained message."""
    late = Collector()
    clients(url, protocol="3.1.1").subscribe(topics.status(DEVICE), late)
    message = decode(TopicKind.STATUS, late.wait_for(1)[0])
    assert isinstance(message, StatusMessage)
    return message


def test_killed_agent_process_leaves_a_retained_offline_status(
    control_plane: ControlPlane, broker_url: str, clients: ClientFactory, tmp_path
) -> None:
    agent = start_agent_process(tmp_path, broker_url, control_plane.topics, from_enrollment=True)
    try:
        wait_for(lambda: any(s.status == "online" for s in statuses(control_plane)))
        idle = control_plane.wait_state(lambda s: s.device_id == DEVICE)
        assert idle.phase == "idle" and idle.current is None
        wait_for(lambda: len(control_plane.telemetry()) >= 2)  # the daemon's telemetry loop
        agent.kill9()
    finally:
        agent.stop()
    wait_for(lambda: statuses(control_plane)[-1].status == "offline")
    will = statuses(control_plane)[-1]
    assert will.reason == "connection lost"
    retained = retained_status(broker_url, control_plane.topics, clients)
    assert retained.status == "offline" and retained.reason == "connection lost"
    # Ordered reports: the will, fixed at connect time, carries its connection's birth seq, so the
    # control plane ranks it after that birth (and after any earlier connection) whatever the order.
    birth = [s for s in statuses(control_plane) if s.status == "online"][-1]
    assert birth.report_seq is not None and will.report_seq == birth.report_seq
    assert status_rank(will) > status_rank(birth)
    assert idle.report_seq is not None


def test_stopped_agent_process_says_offline_before_leaving(
    control_plane: ControlPlane, broker_url: str, clients: ClientFactory, tmp_path
) -> None:
    agent = start_agent_process(tmp_path, broker_url, control_plane.topics, from_enrollment=False)
    wait_for(lambda: any(s.status == "online" for s in statuses(control_plane)))
    agent.stop()  # SIGTERM: uvicorn shuts down gracefully (and then re-raises the signal)
    wait_for(lambda: statuses(control_plane)[-1].status == "offline")
    retained = retained_status(broker_url, control_plane.topics, clients)
    assert retained.status == "offline" and retained.reason == "shutdown"
