"""Simulated devices: each a real MQTT connection with its own credential, speaking the agent's
protocol (the `shared` schemas). They apply desired states after a delay (optionally failing for
chosen versions) and publish synthetic telemetry windows whose latency depends on the version.

One thread and one paho client (`MqttClient`, as the agent's) per device, for tests with a
handful of devices; `slmops.simulate` runs thousands on asyncio. Both act through
`slmops.simulate.behaviour`. The real agent is in `edge_agent/`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.desired import DesiredState
from shared.hardware import HardwareProfile
from shared.messages import StateMessage, StatusMessage, TelemetryMessage, decode, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.mqtt.dedup import RecentIds
from shared.mqtt.url import parse_broker_url
from shared.report_clock import ReportClock
from shared.state import DeviceState
from shared.topics import TopicKind, Topics
from slmops.simulate import behaviour as simulated

log = logging.getLogger("slmops.simulator")


@dataclass
class SimBehaviour:
    """How a simulated device reacts; `latency_ms(version)` drives its telemetry."""

    latency_ms: Callable[[str], float] = lambda _version: 40.0
    failing_versions: frozenset[str] = frozenset()
    apply_delay_s: float = 0.05
    requests_per_window: int = 20
    error_rate: float = 0.0
    rss_mb: float = 120.0
    hardware: HardwareProfile = field(
        default_factory=lambda: HardwareProfile(cpu_model="sim", cpu_cores=4, ram_mb=4096, arch="x86_64")
    )


class SimDevice:
    def __init__(self, url: str, topics: Topics, device_id: str, secret: str, behaviour: SimBehaviour) -> None:
        self.device_id = device_id
        self.topics = topics
        self.behaviour = behaviour
        self.state = DeviceState(device_id=device_id)
        self.applied: list[str] = []  # desired message ids acted on, in order
        self._seq = 0
        self._seen = RecentIds(1024)
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._rng = random.Random(device_id)
        status_topic = topics.status(device_id)
        broker = parse_broker_url(url).with_credentials(device_id, secret)
        # Ordered reports as the agent sends them (edge_agent.mqtt.device): a connection's birth
        # carries the seq of the will armed for it.
        self._clock = ReportClock()
        self._armed_seq = self._clock.next()

        def will() -> Outgoing:
            self._armed_seq = self._clock.next()
            offline = StatusMessage(status="offline", reason="connection lost", report_seq=self._armed_seq)
            return Outgoing(status_topic, encode(offline), retain=True)

        def birth() -> Outgoing:
            online = StatusMessage(
                status="online", agent_version="sim", hardware=behaviour.hardware, report_seq=self._armed_seq
            )
            return Outgoing(status_topic, encode(online), retain=True)

        # Functions, so each connection's will carries a fresh message id (ingest dedups by id).
        self.client = MqttClient(broker, client_id=device_id, will=will, birth=birth)

    def start(self) -> None:
        self.client.subscribe(self.topics.desired(self.device_id), self._on_desired)
        self.client.start(wait=True, timeout_s=60)
        self._publish_state()

    def stop(self) -> None:
        for timer in self._timers:  # a desired state still "downloading" is abandoned, as on power loss
            timer.cancel()
        self.client.stop(publish_offline=True)

    @property
    def current_version(self) -> str | None:
        return self.state.current.version if self.state.current else None

    def _on_desired(self, _topic: str, payload: bytes) -> None:
        try:
            desired = decode(TopicKind.DESIRED, payload)
        except ValueError:
            log.warning("device %s: malformed desired state dropped", self.device_id)
            return
        assert isinstance(desired, DesiredState)
        if not self._seen.first_time(desired.message_id):
            return
        # Never block paho's network thread: apply on a timer, as a real download would.
        timer = threading.Timer(self.behaviour.apply_delay_s, self._apply, args=(desired,))
        self._timers.append(timer)
        timer.start()

    def _apply(self, desired: DesiredState) -> None:
        with self._lock:
            fail = not desired.unload and desired.version in self.behaviour.failing_versions
            self.state = simulated.applied(self.state, desired, fail=fail)
            self.applied.append(desired.message_id)
        self._publish_state()

    def _publish_state(self) -> None:
        with self._lock:
            message = StateMessage.wrap(self.state, updated_at=datetime.now(UTC), report_seq=self._clock.next())
        # Retained, as the agent does: the control plane reads the latest state again after a restart.
        self.client.publish(self.topics.state(self.device_id), encode(message), retain=True, wait=False)

    def telemetry_window(self, seconds: float = 1.0) -> TelemetryMessage | None:
        """One synthetic window for the version being served (None while nothing is served)."""
        current = self.state.current
        if current is None:
            return None
        b = self.behaviour
        self._seq += 1
        return simulated.telemetry_window(
            self.device_id, current, rng=self._rng, seq=self._seq, seconds=seconds,
            latency_ms=b.latency_ms(current.version), requests=b.requests_per_window,
            error_rate=b.error_rate, rss_mb=b.rss_mb,
        )  # fmt: skip

    def publish_telemetry(self) -> bool:
        window = self.telemetry_window()
        if window is None:
            return False
        self.client.publish(self.topics.telemetry(self.device_id), encode(window), wait=False)
        return True
