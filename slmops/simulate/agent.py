"""One simulated agent on asyncio: a real MQTT connection (`wire.MqttWire`) speaking the agent's protocol.

Protocol, as `edge_agent.mqtt.device.DeviceChannel` speaks it: a retained QoS 1 birth `StatusMessage`
with the hardware profile, a retained last will saying offline, the retained device state
republished on every connect, desired states deduplicated by message id (an empty retained
payload means "cleared"), and telemetry windows at an interval. Given a root to trust
(`SimConfig.trusted_root`), it verifies each desired state's signed release with the agent's own
`edge_agent.trust.ReleaseGuard` before acting on it, or refuses it. Like download and activation
events, the agent's `release_verified` event is not sent: the simulator models what a rollout
waits for (the acknowledging state), and counts verifications in `SimStats`.
Thousands of these share one event loop: paho's own threaded loop waits on select(), which
cannot watch descriptors above 1,024.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge_agent.trust import ReleaseGuard
from shared.desired import DesiredState
from shared.hardware import HardwareProfile
from shared.messages import (
    MessageDecodeError,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    decode,
    encode,
    new_message_id,
)
from shared.mqtt.dedup import RecentIds
from shared.mqtt.url import parse_broker_urls
from shared.report_clock import ReportClock
from shared.signing import ReleaseRefused, SignedMetadata
from shared.topics import TopicKind, Topics
from slmops.simulate import behaviour as simulated
from slmops.simulate.wire import MqttWire, Will, WireError

log = logging.getLogger("slmops.simulate")
AGENT_VERSION = "sim"
# A node whose cluster is electing leaders may hold a CONNECT unanswered: try the next one sooner.
CLUSTER_CONNECT_TIMEOUT_S = 10.0


@dataclass
class SimConfig:
    """How every simulated agent behaves. `latency_ms` may depend on the version served."""

    apply_delay_s: float = 0.5
    failure_rate: float = 0.0  # chance that a desired state naming a new version ends in activation_failed
    telemetry_interval_s: float | None = 10.0  # None: no telemetry
    latency_ms: Callable[[str], float] = field(default=lambda _version: 40.0)
    requests_per_window: int = 20
    error_rate: float = 0.0
    rss_mb: float = 120.0
    reconnect_delay_s: float = 1.0
    # The root chain devices are provisioned with; None: releases are not verified (as an agent
    # without a root). Read at each desired state, so a benchmark may switch it between rollouts.
    trusted_root: list[SignedMetadata] | None = None
    hardware: HardwareProfile = field(
        default_factory=lambda: HardwareProfile(
            cpu_model="sim", cpu_cores=4, ram_mb=4096, arch="x86_64", agent_version=AGENT_VERSION
        )
    )


@dataclass
class SimStats:
    """Fleet-wide counters, shared by every agent of one process."""

    connected: int = 0
    connects: int = 0
    connect_errors: int = 0
    applied: int = 0
    failed: int = 0
    telemetry_sent: int = 0
    malformed_desired: int = 0
    verified: int = 0  # releases verified (ReleaseGuard.verify passed)
    refused: int = 0  # desired states refused for their release
    verify_s: float = 0.0  # time spent in ReleaseGuard.verify and accept, all devices together
    # Called after every applied or failed desired state (`SimFleet.wait`): a waiter sees the
    # count that completes it at once, where polling was late by half its interval on average.
    listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def notify(self) -> None:
        for listener in list(self.listeners):
            listener()


@dataclass(frozen=True)
class Credential:
    device_id: str
    device_secret: str
    mqtt_url: str
    topic_prefix: str


class SimAgent:
    def __init__(self, credential: Credential, config: SimConfig, stats: SimStats) -> None:
        self.device_id = credential.device_id
        self.credential = credential
        self.topics = Topics(credential.topic_prefix)
        # Built once, not per publish: the simulator shares the machine with what it tests
        # (docs/performance.md#fleet-paths).
        self._state_topic = self.topics.state(credential.device_id)
        self._telemetry_topic = self.topics.telemetry(credential.device_id)
        self._guard: ReleaseGuard | None = None  # made from config.trusted_root on first use
        self.config = config
        self.stats = stats
        # Kept as the message it is published as: each publish copies it with a new envelope, no
        # StateMessage.wrap per state (docs/performance.md#fleet-paths).
        self.state = StateMessage(device_id=credential.device_id)
        self.applied: list[str] = []  # desired message ids acted on, in order
        self.connected = asyncio.Event()
        self._wire: MqttWire | None = None
        self._seen = RecentIds(64)
        self._seq = 0
        # Ordered reports as the agent sends them (shared.messages.Ordered): one seq per connection
        # for its will, birth and shutdown, the next one for each state.
        self._clock = ReportClock()
        self._connection_seq = 0
        self._rng = random.Random(credential.device_id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_node = zlib.crc32(credential.device_id.encode("utf-8"))
        self._failures = 0  # connections lost or refused: each moves to the next broker node

    @property
    def current_version(self) -> str | None:
        return self.state.current.version if self.state.current else None

    async def _open(self) -> MqttWire:
        brokers = parse_broker_urls(self.credential.mqtt_url)
        # Several URLs are a cluster's nodes: start on one chosen by device id (a fleet spreads over
        # them) and move to the next after each lost connection, as MqttClient does.
        broker = brokers[(self._start_node + self._failures) % len(brokers)]
        # A fresh will per connection: ingest deduplicates by message id.
        self._connection_seq = self._clock.next()
        will = StatusMessage(
            status="offline", agent_version=AGENT_VERSION, reason="connection lost", report_seq=self._connection_seq
        )
        return await MqttWire.open(
            broker.host, broker.port, self.device_id, on_message=self._on_message, username=self.device_id,
            password=self.credential.device_secret, will=Will(self.topics.status(self.device_id), encode(will)),
            tls=broker.tls, timeout_s=60.0 if len(brokers) == 1 else CLUSTER_CONNECT_TIMEOUT_S,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop` is set, reconnecting after a lost connection."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except WireError as exc:
                if self._wire is not None:
                    self._wire.abort()  # e.g. a refused subscription: the next try goes to another node
                self._failures += 1
                self.stats.connect_errors += 1
                log.debug("device %s: %s; reconnecting", self.device_id, exc)
            finally:
                self._wire = None
                if self.connected.is_set():
                    self.connected.clear()
                    self.stats.connected -= 1
            if not stop.is_set():
                await _wait(stop, self.config.reconnect_delay_s * (0.5 + self._rng.random()))

    async def _session(self, stop: asyncio.Event) -> None:
        wire = self._wire = await self._open()
        birth = StatusMessage(
            status="online", agent_version=AGENT_VERSION, hardware=self.config.hardware, report_seq=self._connection_seq
        )
        await wire.publish(self.topics.status(self.device_id), encode(birth), qos=1, retain=True)
        await wire.subscribe(self.topics.desired(self.device_id), qos=1)
        await self._publish_state()
        self.connected.set()
        self.stats.connected += 1
        self.stats.connects += 1
        telemetry = asyncio.create_task(self._telemetry_loop(stop))
        stopper = asyncio.create_task(stop.wait())
        try:
            waiting: set[asyncio.Future[object]] = {stopper, wire.closed}  # type: ignore[arg-type]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            telemetry.cancel()
            stopper.cancel()
        if not stop.is_set():
            raise WireError("the broker closed the connection")
        for task in list(self._tasks):  # pending applies survive a reconnect, not a stop
            task.cancel()
        # A clean stop says why it went offline (the will is only for a lost connection).
        offline = StatusMessage(
            status="offline", agent_version=AGENT_VERSION, reason="shutdown", report_seq=self._connection_seq
        )
        await wire.publish(self.topics.status(self.device_id), encode(offline), qos=1, retain=True)
        await wire.close()

    def _on_message(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # an empty retained message: the control plane cleared the desired state
        try:
            desired = decode(TopicKind.DESIRED, payload)
        except MessageDecodeError:
            self.stats.malformed_desired += 1
            log.warning("device %s: malformed desired state dropped", self.device_id)
            return
        assert isinstance(desired, DesiredState)
        if not self._seen.first_time(desired.message_id):
            return
        if self.config.apply_delay_s <= 0:
            # Acted on at once: the state goes out in the same write as the PUBACK (wire.py
            # gathers what a read produces), with no task per message.
            self._apply_now(desired)
            return
        # Applied later, as a real download and activation would be; reading goes on meanwhile.
        task = asyncio.create_task(self._apply_later(desired))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_later(self, desired: DesiredState) -> None:
        await asyncio.sleep(self.config.apply_delay_s)
        self._apply_now(desired)

    def _apply_now(self, desired: DesiredState) -> None:
        if not self._release_verified(desired):
            return
        known = {ref.version for ref in (self.state.current, self.state.previous) if ref is not None}
        # Only a version new to the device can fail: going back to one it ran (a rollback) succeeds.
        fail = not desired.unload and desired.version not in known and self._rng.random() < self.config.failure_rate
        # The envelope of the state sent comes in the same copy (one model_copy per message, not two).
        self.state = simulated.applied(self.state, desired, fail=fail, envelope=self._envelope())
        if fail:
            self.stats.failed += 1
        else:
            self.stats.applied += 1
        self.applied.append(desired.message_id)
        self._send_state(fresh=True)
        self.stats.notify()

    def _release_verified(self, desired: DesiredState) -> bool:
        """The agent's check before acting (edge_agent.reconciler): verify and remember, or refuse."""
        root = self.config.trusted_root
        if root is None:
            return True
        started = time.perf_counter()
        if self._guard is None:
            self._guard = ReleaseGuard.in_memory(root)
        try:
            verified = self._guard.verify(desired)
        except ReleaseRefused as exc:
            self.stats.refused += 1
            self.state = simulated.refused(self.state, desired, str(exc), envelope=self._envelope())
            self._send_state(fresh=True)
            self.stats.notify()
            return False
        self._guard.accept(verified)
        self.stats.verify_s += time.perf_counter() - started
        self.stats.verified += 1
        return True

    async def _publish_state(self) -> None:
        """Publish the state and wait for its PUBACK (on connect)."""
        sent = self._send_state()
        if sent is not None:
            try:
                await sent
            except WireError:
                pass  # the connection dropped: the next connect republishes the latest state

    def _envelope(self) -> dict[str, object]:
        now = datetime.now(UTC)
        return {"message_id": new_message_id(), "sent_at": now, "updated_at": now, "report_seq": self._clock.next()}

    def _send_state(self, *, fresh: bool = False) -> asyncio.Future[None] | None:
        """Write the state (QoS 1, retained); the future ends at its PUBACK. None if not connected.

        `fresh`: `self.state` already carries a new envelope (message id, times) for this send."""
        if self._wire is None:
            return None  # published on the next connect (with an envelope of its own)
        message = self.state if fresh else self.state.model_copy(update=self._envelope())
        try:
            sent = self._wire.publish_nowait(self._state_topic, encode(message), qos=1, retain=True)
        except WireError:
            return None  # the connection dropped: the next connect republishes the latest state
        sent.add_done_callback(_consume)
        return sent

    async def _telemetry_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.telemetry_interval_s
        if not interval:
            return
        # A random phase spreads a fleet's windows over the interval instead of one burst.
        await asyncio.sleep(self._rng.random() * interval)
        while not stop.is_set():
            await self.send_telemetry(interval)
            await asyncio.sleep(interval)

    async def send_telemetry(self, window_s: float = 1.0) -> bool:
        """Publish one window (QoS 1, awaiting the PUBACK); False if none was sent."""
        window = self.telemetry_window(window_s)
        if window is None or self._wire is None:
            return False
        try:
            await self._wire.publish(self._telemetry_topic, encode(window), qos=1)
        except WireError:
            return False  # lost with the connection; a real agent would spool it
        self.stats.telemetry_sent += 1
        return True

    def telemetry_window(self, seconds: float) -> TelemetryMessage | None:
        """One synthetic window for the version being served (None while nothing is served)."""
        current = self.state.current
        if current is None:
            return None
        cfg = self.config
        self._seq += 1
        return simulated.telemetry_window(
            self.device_id, current, rng=self._rng, seq=self._seq, seconds=seconds,
            latency_ms=cfg.latency_ms(current.version), requests=cfg.requests_per_window,
            error_rate=cfg.error_rate, rss_mb=cfg.rss_mb,
        )  # fmt: skip


def _consume(future: asyncio.Future[None]) -> None:
    """Retrieve a PUBACK future's outcome nobody awaits (a lost connection is handled on reconnect)."""
    if not future.cancelled():
        future.exception()


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
