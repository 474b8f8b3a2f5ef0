"""DeviceChannel and DesiredStatePublisher end to end, on a private Mosquitto with the device ACL
in force (so the channel provably uses only the topics a device is allowed)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from control_plane.fleet.subscriber import DeviceMessage, DeviceMessageSubscriber
from edge_agent.mqtt.device import DeviceChannel
from shared.desired import ArtifactRef, DesiredState
from shared.hardware import HardwareProfile
from shared.messages import EventMessage, StatusMessage, TelemetryMessage
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind
from tests.support.desired_publisher import DesiredStatePublisher
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import ClientFactory, clients, private_mosquitto
from tests.support.waiting import wait_for

__all__ = ["clients", "private_mosquitto"]  # fixtures


def desired(version: str, message_id: str) -> DesiredState:
    artifact = ArtifactRef(sha256="cd" * 32, size_bytes=10, format="gguf")
    return DesiredState(message_id=message_id, model="tiny", version=version, artifact=artifact)


class Inbox:
    def __init__(self) -> None:
        self.items: list[DeviceMessage] = []
        self._lock = threading.Lock()

    def __call__(self, batch: list[DeviceMessage]) -> None:
        with self._lock:
            self.items.extend(batch)

    def of(self, kind: TopicKind) -> list[object]:
        with self._lock:
            return [m.message for m in self.items if m.kind == kind]


def test_device_channel_round_trip_through_outage(
    private_mosquitto: MosquittoProcess, clients: ClientFactory, tmp_path: Path
) -> None:
    private_mosquitto.start({"dev-1": "s1"})
    topics = private_mosquitto.topics
    # Persistent session: what the device sends before the control plane is back waits in the broker.
    cp_client = clients(
        private_mosquitto.admin_url,
        client_id="cp-ingest",
        persistent_session=True,
        reconnect_min_delay_s=1,
        reconnect_max_delay_s=2,
    )
    inbox = Inbox()
    ingest = DeviceMessageSubscriber(cp_client, topics, inbox, max_delay_s=0.05)
    ingest.start()
    publisher = DesiredStatePublisher(cp_client, topics)
    publisher.publish("dev-1", desired("1", "m-1"))  # retained before the device exists

    received: list[DesiredState] = []
    channel = DeviceChannel(
        private_mosquitto.url("dev-1", "s1"),
        device_id="dev-1",
        topics=topics,
        on_desired=received.append,
        spool_path=tmp_path / "spool.db",
        hardware=HardwareProfile(ram_mb=2048, arch="x86_64"),
        agent_version="0.1.0",
        reconnect_max_delay_s=2,
    )
    channel.start(wait=True)
    try:
        wait_for(lambda: [d.version for d in received] == ["1"])
        wait_for(lambda: len(inbox.of(TopicKind.STATUS)) >= 1)
        births = inbox.of(TopicKind.STATUS)
        assert isinstance(births[0], StatusMessage) and births[0].hardware == HardwareProfile(
            ram_mb=2048, arch="x86_64"
        )
        assert channel.publish_state(DeviceState(phase="committed"))
        assert channel.publish_event(EventMessage(kind="activation_succeeded", version="1"))
        publisher.publish("dev-1", desired("1", "m-1"))  # the same message again: applied once
        publisher.client.publish(topics.desired("dev-1"), b"{garbage", retain=False)
        wait_for(lambda: channel.counters.desired_duplicates >= 1 and channel.counters.desired_malformed == 1)

        private_mosquitto.stop()
        wait_for(lambda: not channel.connected)
        now = datetime.now(UTC)
        for seq in range(3):
            assert not channel.publish_telemetry(TelemetryWindow(seq=seq, window_start=now, window_end=now))
        assert not channel.publish_event(EventMessage(kind="download_progress", bytes_done=1))
        private_mosquitto.start()
        wait_for(lambda: len(inbox.of(TopicKind.TELEMETRY)) == 3)
        publisher.publish("dev-1", desired("2", "m-2"))
        wait_for(lambda: [d.version for d in received] == ["1", "2"])
        channel.stop()  # a clean stop publishes "offline" itself (the broker drops the will)
        wait_for(lambda: _statuses(inbox)[-1:] == ["offline"])
        last = inbox.of(TopicKind.STATUS)[-1]
        assert isinstance(last, StatusMessage) and last.reason == "shutdown"
    finally:
        channel.stop()
        ingest.stop()
    telemetry = inbox.of(TopicKind.TELEMETRY)
    assert [t.seq for t in telemetry if isinstance(t, TelemetryMessage)] == [0, 1, 2]
    assert [e.kind for e in inbox.of(TopicKind.EVENTS) if isinstance(e, EventMessage)] == ["activation_succeeded"]
    assert channel.counters.events_dropped_offline == 1
    assert _statuses(inbox)[0] == "online"
    assert [s.phase for s in inbox.of(TopicKind.STATE) if isinstance(s, DeviceState)][0] == "committed"


def _statuses(inbox: Inbox) -> list[str]:
    return [s.status for s in inbox.of(TopicKind.STATUS) if isinstance(s, StatusMessage)]
