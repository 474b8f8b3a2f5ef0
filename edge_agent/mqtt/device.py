"""The agent's side of the channel, wired once: will, birth, desired state in, state/events/telemetry out.

On every (re)connect the broker gets the birth message (online, agent version, hardware profile)
and the device's latest state, and the desired-state subscription is restored, so the broker's
retained desired state arrives again. Desired states reach `on_desired` decoded and once per
message id; malformed ones are counted and dropped. Telemetry and important events go through the
on-disk spool, so an outage loses nothing within its bound.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.mqtt.outbox import SpooledPublisher
from edge_agent.mqtt.spool import MessageSpool
from shared.desired import DesiredState
from shared.hardware import HardwareProfile
from shared.messages import (
    EventMessage,
    MessageDecodeError,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    decode,
    encode,
)
from shared.mqtt.client import MqttClient
from shared.mqtt.dedup import RecentIds
from shared.mqtt.errors import MqttPublishError
from shared.mqtt.types import Outgoing, Protocol
from shared.report_clock import ReportClock
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind, Topics

log = logging.getLogger(__name__)

# Progress is superseded by the next report: not worth keeping through an outage.
_EPHEMERAL_EVENTS = frozenset({"download_progress"})


@dataclass
class DeviceChannelCounters:
    desired_received: int = 0
    desired_duplicates: int = 0
    desired_malformed: int = 0
    events_dropped_offline: int = 0


class DeviceChannel:
    """One device's MQTT session; `on_desired` runs on paho's thread and must only hand off."""

    def __init__(
        self,
        url: str,
        *,
        device_id: str,
        on_desired: Callable[[DesiredState], None],
        spool_path: Path,
        topics: Topics | None = None,
        hardware: HardwareProfile | None = None,
        agent_version: str = "",
        protocol: Protocol = "auto",
        spool_max_messages: int = 10_000,
        reconnect_max_delay_s: int = 30,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.device_id = device_id
        self.topics = topics or Topics()
        self.counters = DeviceChannelCounters()
        self._on_desired = on_desired
        self._hardware = hardware
        self._agent_version = agent_version
        self._dedup = RecentIds(256)
        self._state_lock = threading.Lock()
        self._last_state: StateMessage | None = None
        # Orders this device's state and status reports (shared.messages.Ordered): the will armed
        # for the next connection takes a value, and that connection's birth and shutdown reuse it.
        self._clock = ReportClock(spool_path.with_name(spool_path.name + ".report-seq"))
        self._armed_seq = self._connection_seq = self._clock.next()
        self._stopped = False
        self.client = MqttClient(
            url,
            client_id=device_id,
            protocol=protocol,
            will=self._will,
            birth=self._birth,
            reconnect_max_delay_s=reconnect_max_delay_s,
            tls_context=tls_context,
        )
        self.outbox = SpooledPublisher(self.client, MessageSpool(spool_path, max_messages=spool_max_messages))

    def start(self, *, wait: bool = False, timeout_s: float = 10.0) -> None:
        """Connect in the background (the broker may be down at boot; paho retries with backoff)."""
        self.client.subscribe(self.topics.desired(self.device_id), self._on_desired_payload, timeout_s=None)
        self.client.add_connection_listener(self._on_connection)
        self.outbox.start()
        self.client.start(wait=wait, timeout_s=timeout_s)

    def stop(self) -> None:
        """Publish "offline", disconnect, close the spool; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.outbox.stop()
        if self.client.connected:
            # A clean DISCONNECT discards the will (MQTT 3.1.1 section 3.14.4): say it ourselves.
            offline = StatusMessage(
                status="offline", agent_version=self._agent_version, reason="shutdown", report_seq=self._connection_seq
            )
            try:
                self.client.publish(self.topics.status(self.device_id), encode(offline), retain=True, timeout_s=5)
            except MqttPublishError:
                log.warning("device %s could not publish its offline status", self.device_id)
        self.client.stop(publish_offline=False)
        self.outbox.spool.close()

    @property
    def connected(self) -> bool:
        return self.client.connected

    def publish_state(self, state: DeviceState) -> bool:
        """Retained, so a control plane that restarts reads every device's latest state at once."""
        message = StateMessage.wrap(state, report_seq=self._clock.next())
        with self._state_lock:
            self._last_state = message
        try:
            self.client.publish(self.topics.state(self.device_id), encode(message), qos=1, retain=True)
        except MqttPublishError:
            return False  # republished on the next connect
        return True

    def publish_event(self, event: EventMessage) -> bool:
        topic = self.topics.events(self.device_id)
        if event.kind in _EPHEMERAL_EVENTS:
            try:
                self.client.publish(topic, encode(event), qos=1, wait=False)
            except MqttPublishError:
                self.counters.events_dropped_offline += 1
                return False
            return True
        return self.outbox.publish(topic, encode(event))

    def publish_telemetry(self, window: TelemetryWindow) -> bool:
        """Sent now, or spooled; windows the spool had to drop are counted in this message."""
        message = TelemetryMessage.wrap(window, dropped_windows=self.outbox.spool.take_dropped())
        return self.outbox.publish(self.topics.telemetry(self.device_id), encode(message))

    def _will(self) -> Outgoing:
        # Armed before each CONNECT (and again after each birth, for the next one).
        self._armed_seq = self._clock.next()
        offline = StatusMessage(
            status="offline", agent_version=self._agent_version, reason="connection lost", report_seq=self._armed_seq
        )
        return Outgoing(self.topics.status(self.device_id), encode(offline), qos=1, retain=True)

    def _birth(self) -> Outgoing:
        # Called on connect before the next will is armed: the will this connection holds is the armed one.
        self._connection_seq = self._armed_seq
        birth = StatusMessage(
            status="online", agent_version=self._agent_version, hardware=self._hardware, report_seq=self._connection_seq
        )
        return Outgoing(self.topics.status(self.device_id), encode(birth), qos=1, retain=True)

    def _on_connection(self, connected: bool) -> None:
        if not connected:
            return
        with self._state_lock:
            last = self._last_state
        if last is not None:
            # On paho's thread: queue it, never wait for the PUBACK here.
            self.client.publish(self.topics.state(self.device_id), encode(last), retain=True, wait=False)

    def _on_desired_payload(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # an empty retained message: the control plane cleared the desired state
        try:
            desired = decode(TopicKind.DESIRED, payload)
        except MessageDecodeError as exc:
            self.counters.desired_malformed += 1
            log.warning("device %s dropped a malformed desired state: %s", self.device_id, exc)
            return
        if not isinstance(desired, DesiredState):  # model_for(DESIRED) is DesiredState
            return
        if not self._dedup.first_time(desired.message_id):
            self.counters.desired_duplicates += 1
            return
        self.counters.desired_received += 1
        self._on_desired(desired)
