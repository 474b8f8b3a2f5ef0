"""The agent's MQTT channel: desired state from the broker into the reconcile loop, and the agent's
state transitions, events and telemetry windows out to the control plane.

The wire protocol (will, birth, retained state republished on reconnect, desired-state dedup,
the on-disk spool) lives in `edge_agent.mqtt.device.DeviceChannel`; this module adapts one `Agent` to
it. Agent observers run on the agent's own threads (reconcile, download, telemetry), and a publish
waits for the broker's PUBACK, so observers only queue: one publisher thread sends in order and a
slow or absent broker never stalls reconciliation.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.enroll import hardware_profile
from edge_agent.mqtt.device import DeviceChannel, DeviceChannelCounters
from edge_agent.mqtt.spool import MessageSpool
from edge_agent.reconciler import REFUSED
from edge_agent.settings import AgentSettings, ConfigError
from edge_agent.tls import has_identity, plaintext_problem, ssl_context
from shared.messages import EventKind, EventMessage, MessageDecodeError, decode
from shared.mqtt.types import Protocol
from shared.mqtt.url import format_broker_url, parse_broker_urls
from shared.state import DeviceState, ModelRef, Phase
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind, Topics

if TYPE_CHECKING:
    from edge_agent.agent import Agent, AgentEvent
    from edge_agent.download import Progress
    from shared.desired import DesiredState

log = logging.getLogger(__name__)

SPOOL_FILE = "mqtt-spool.db"

# The events a phase change stands for; they go through the spool, so the control plane keeps the
# history of a swap even when the retained state it reads later shows only where it ended.
_PHASE_EVENTS: dict[Phase, tuple[EventKind, ...]] = {
    "downloading": ("download_started",),
    "activating": ("download_completed", "activation_started"),
    "on_trial": ("activation_succeeded",),
    "download_failed": ("download_failed",),
    "activation_failed": ("activation_failed",),
    "rolled_back": ("rollback",),
}

_Item = tuple[str, object]  # ("state" | "telemetry" | "event", payload); ("stop", None) ends the thread


def device_url(url: str, device_id: str, device_secret: str) -> str:
    """The broker URL(s) with the device credential in each (username = device id, MQTT 3.1.1
    s. 3.1.3.4); several are a cluster's nodes, comma-separated."""
    return ",".join(
        format_broker_url(broker.with_credentials(device_id, device_secret)) for broker in parse_broker_urls(url)
    )


def _tls_context(settings: AgentSettings) -> ssl.SSLContext:
    """The broker verified with ca_bundle; the device certificate presented when it has one."""
    identity = (settings.client_cert_path, settings.client_key_path)
    return ssl_context(settings.ca_bundle, identity if settings.x509_identity and has_identity(*identity) else None)


class MqttChannel:
    """One agent's MQTT session: `start()` after `agent.start()`, `stop()` before `agent.stop()`."""

    def __init__(
        self,
        agent: Agent,
        *,
        url: str,
        device_id: str,
        device_secret: str,
        topics: Topics,
        spool_path: Path,
        protocol: Protocol = "auto",
        spool_max_messages: int = 10_000,
        progress_interval_s: float = 0.5,
        reconnect_max_delay_s: int = 30,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.agent = agent
        self.device_id = device_id
        self.topics = topics
        self.device = DeviceChannel(
            device_url(url, device_id, device_secret),
            device_id=device_id,
            on_desired=self._on_desired,
            spool_path=spool_path,
            topics=topics,
            hardware=hardware_profile(),
            agent_version=__version__,
            protocol=protocol,
            spool_max_messages=spool_max_messages,
            reconnect_max_delay_s=reconnect_max_delay_s,
            tls_context=tls_context,
        )
        self._progress_interval_s = progress_interval_s
        self._last_progress_at = float("-inf")
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._last_phase: Phase | None = None
        self._last_pending: ModelRef | None = None

    @classmethod
    def for_agent(cls, agent: Agent, **options: object) -> MqttChannel | None:
        """The channel an enrolled agent should run, or None when it has no broker URL or credential."""
        credential = agent.credential
        url = agent.settings.mqtt_url or (credential.mqtt_url if credential else None)
        if url is None:
            return None
        if credential is None:
            log.warning("mqtt_url is set but the agent has no device credential; not connecting to %s", url)
            return None
        for node in url.split(","):
            if not agent.settings.allow_insecure_http and (problem := plaintext_problem(node.strip())):
                raise ConfigError(f"broker URL refused: {problem}")
        tls_context = _tls_context(agent.settings) if parse_broker_urls(url)[0].tls else None
        if tls_context is not None and agent.settings.x509_identity:
            # A renewed certificate is presented from the next (re)connection; this one stays up.
            s = agent.settings
            agent.identity_listeners.append(lambda: tls_context.load_cert_chain(s.client_cert_path, s.client_key_path))
        return cls(
            agent,
            url=url,
            device_id=credential.device_id,
            device_secret=credential.device_secret,
            topics=Topics(credential.topic_prefix),
            spool_path=agent.settings.data_dir / SPOOL_FILE,
            tls_context=tls_context,
            **options,  # type: ignore[arg-type]
        )

    def use_secret(self, secret: str) -> None:
        """A rotated credential: the next CONNECT uses it (the live session was authenticated)."""
        self.device.client.set_password(secret)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, *, wait: bool = False, timeout_s: float = 10.0) -> None:
        """Connect (in the background unless `wait`); the broker may be down at boot."""
        # A second handler on the desired filter: DeviceChannel counts and drops malformed
        # payloads; this one tells the control plane about them on the events topic.
        self.device.client.subscribe(self.topics.desired(self.device_id), self._report_malformed, timeout_s=None)
        self.agent.subscribe(self._observe)
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()
        self.device.start(wait=wait, timeout_s=timeout_s)
        log.info("MQTT channel for device %s started (%s)", self.device_id, self.device.client.url.redacted())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (or spool it), publish "offline" and disconnect; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._queue.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.device.stop()

    @property
    def connected(self) -> bool:
        return self.device.connected

    @property
    def counters(self) -> DeviceChannelCounters:
        return self.device.counters

    @property
    def spool(self) -> MessageSpool:
        return self.device.outbox.spool

    # -- desired state in -------------------------------------------------------------------------

    def _on_desired(self, desired: DesiredState) -> None:
        # On paho's network thread: queue it for the reconcile loop, the same one the file feeds.
        log.info("device %s received desired %s %s", self.device_id, desired.model, desired.version)
        self.agent.submit_desired(desired)

    def _report_malformed(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            decode(TopicKind.DESIRED, payload)
        except MessageDecodeError as exc:
            event = EventMessage(
                kind="error",
                message=f"dropped a malformed desired state: {exc}"[:500],
                detail={"topic": "desired", "reason": exc.reason},
            )
            self._queue.put(("event", event))

    # -- agent events out -------------------------------------------------------------------------

    def _observe(self, event: AgentEvent) -> None:
        """The agent's observer: queue only (it runs on the agent's threads)."""
        if self._stopped.is_set():
            return
        if event.kind == "progress":
            progress: Progress = event.payload  # type: ignore[assignment]
            now = time.monotonic()
            finished = progress.bytes_done >= progress.bytes_total
            if not finished and now - self._last_progress_at < self._progress_interval_s:
                return  # progress is superseded by the next report: rate-limit it
            self._last_progress_at = now
            self._queue.put(("event", self._progress_event(progress)))
        else:
            self._queue.put((event.kind, event.payload))

    def _progress_event(self, progress: Progress) -> EventMessage:
        pending = self.agent.reconciler.state.pending
        return EventMessage(
            kind="download_progress",
            model=pending.model if pending else None,
            version=pending.version if pending else None,
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            rate_bytes_per_s=max(progress.rate_bps, 0.0),
            detail={"sha256": progress.sha256, "resumed_from": progress.resumed_from},
        )

    def _run(self) -> None:
        # Recovery decides what the device serves; reporting before it finishes would claim "idle".
        while not self.agent.started.wait(0.2):
            if self._stopped.is_set():
                break
        snapshot = self.agent.device_state()
        self._last_phase = snapshot.phase  # a restart is not a new transition: no events for it
        self.device.publish_state(snapshot)
        while True:
            kind, payload = self._queue.get()
            if kind == "stop":
                return
            try:
                self._publish(kind, payload)
            except Exception:  # one bad message must not end the publisher
                log.exception("device %s could not publish a %s message", self.device_id, kind)

    def _publish(self, kind: str, payload: object) -> None:
        if kind == "state" and isinstance(payload, DeviceState):
            self._publish_state(payload)
        elif kind == "telemetry" and isinstance(payload, TelemetryWindow):
            self.device.publish_telemetry(payload)
        elif kind == "event" and isinstance(payload, EventMessage):
            self.device.publish_event(payload)

    def _publish_state(self, state: DeviceState) -> None:
        # Not connected: DeviceChannel keeps it as the latest state and publishes it on connect.
        self.device.publish_state(state)
        for event in self._phase_events(state):
            self.device.publish_event(event)

    def _phase_events(self, state: DeviceState) -> list[EventMessage]:
        changed = state.phase != self._last_phase
        self._last_phase = state.phase
        if state.pending is not None:
            self._last_pending = state.pending
        if not changed:
            return []
        # Failures clear `pending`; the event still names the version that failed.
        subject = state.pending or (self._last_pending if state.phase.endswith("_failed") else state.current)
        detail: dict[str, object] = {"desired_message_id": state.desired_message_id, "rollout_id": state.rollout_id}
        if state.phase == "on_trial" and state.golden is not None:  # the pass rate goes with the result
            detail["golden"] = state.golden.model_dump(mode="json", exclude={"schema_version"})
        kinds = _PHASE_EVENTS.get(state.phase, ())
        if state.phase == "download_failed" and (state.reason or "").startswith("integrity_check_failed"):
            kinds = ("verification_failed",)
        if state.phase == "download_failed" and (state.reason or "").startswith(REFUSED):
            kinds = ()  # the agent reported the refusal as a release_refused event
        return [
            EventMessage(
                kind=kind,
                model=subject.model if subject else None,
                version=subject.version if subject else None,
                message=state.reason or "",
                detail=detail,
            )
            for kind in kinds
        ]
