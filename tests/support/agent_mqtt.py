"""Helpers for the agent's MQTT channel tests: an in-process device and a test control plane."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.enroll import Credential
from edge_agent.fsutil import write_atomic
from edge_agent.mqtt.channel import MqttChannel
from edge_agent.settings import AgentSettings
from shared.desired import DesiredState
from shared.messages import EventMessage, StateMessage, TelemetryMessage, decode, encode, message_id_of
from shared.mqtt.client import MqttClient
from shared.topics import DEVICE_PUBLISHED_KINDS, TopicKind, Topics
from tests.support.agent import ArtifactServer
from tests.support.mqtt import Collector, clear_retained
from tests.support.waiting import wait_for

DEVICE = "dev-mqtt-1"
SECRET = "device-secret-1"


def write_credential(data_dir: Path, topics: Topics, mqtt_url: str | None = None) -> None:
    credential = Credential(device_id=DEVICE, device_secret=SECRET, mqtt_url=mqtt_url, topic_prefix=topics.prefix)
    data_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(data_dir / "credential.json", credential.model_dump_json().encode(), mode=0o600)


class Device:
    """An in-process agent and its channel; `close()` stops both."""

    def __init__(self, data_dir: Path, url: str, topics: Topics, artifacts: ArtifactServer, **options: Any) -> None:
        write_credential(data_dir, topics)
        settings = AgentSettings(
            data_dir=data_dir,
            control_plane_url=artifacts.url,
            threads=1,
            telemetry_window_s=3600,  # windows come only from emit_telemetry(): counts stay exact
            trial_requests=1000,
            download_backoff_s=0.05,
        )
        self.agent = Agent(settings)
        self.agent.start()
        assert self.agent.credential is not None and self.agent.credential.device_id == DEVICE
        self.channel = MqttChannel(
            self.agent,
            url=url,
            device_id=DEVICE,
            device_secret=SECRET,
            topics=topics,
            spool_path=data_dir / "mqtt-spool.db",
            protocol=options.pop("protocol", "auto"),
            reconnect_max_delay_s=2,
            **options,
        )

    def close(self) -> None:
        self.channel.stop()
        self.agent.stop()


class ControlPlane:
    """Publishes desired states and decodes everything the device sends."""

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.inbox = Collector()
        # What the device publishes, not `desired` (as the real control plane): amqtt 0.12 sends a
        # retained message to a new subscriber once per matching subscription it holds.
        for kind in DEVICE_PUBLISHED_KINDS:
            client.subscribe(topics.device(DEVICE, kind), self.inbox)

    def publish_desired(self, desired: DesiredState | bytes, *, retain: bool = True) -> None:
        payload = desired if isinstance(desired, bytes) else encode(desired)
        self.client.publish(self.topics.desired(DEVICE), payload, retain=retain)

    def received(self, kind: TopicKind) -> list[Any]:
        """Decoded messages in arrival order, each message id once (QoS 1 is at least once: a
        broker restarted before it saw our PUBACK delivers the message again)."""
        topic = self.topics.device(DEVICE, kind)
        messages = [decode(kind, p) for p in self.inbox.payloads(topic) if p]
        first: dict[str, Any] = {}
        for message in messages:
            first.setdefault(message_id_of(message) or "", message)
        return list(first.values())

    def states(self) -> list[StateMessage]:
        return self.received(TopicKind.STATE)

    def events(self, kind: str | None = None) -> list[EventMessage]:
        return [e for e in self.received(TopicKind.EVENTS) if kind is None or e.kind == kind]

    def telemetry(self) -> list[TelemetryMessage]:
        return self.received(TopicKind.TELEMETRY)

    def wait_state(self, check: Callable[[StateMessage], bool]) -> StateMessage:
        wait_for(lambda: any(check(s) for s in self.states()), timeout_s=60, what=lambda: self.states())
        return next(s for s in self.states() if check(s))

    def clear(self) -> None:
        clear_retained(self.client, [self.topics.device(DEVICE, k) for k in TopicKind])


def serving(version: str) -> Callable[[StateMessage], bool]:
    return lambda s: s.phase == "on_trial" and s.current is not None and s.current.version == version
