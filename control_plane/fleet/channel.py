"""The control plane's fleet side: broker connection, ingest, publisher and the controller loop.

FleetRuntime.start()
  -> embedded amqtt broker (no SLMOPS_MQTT_URL) or the external broker
  -> DeviceMessageSubscriber (or JetStreamIngest, SLMOPS_INGEST_SOURCE=jetstream) -> IngestWriter (SQL)
  -> controller thread: if leader, RolloutController.tick() then the Publisher sends pending desired states
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
import threading
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.config import Settings
from control_plane.fleet.broker import EmbeddedBroker
from control_plane.fleet.credentials import client_id_for
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.journal import IngestJournal
from control_plane.fleet.publisher import Publisher, PublishTuning
from control_plane.fleet.subscriber import DeviceMessageSubscriber
from control_plane.models import Device
from control_plane.rollouts import resign
from control_plane.rollouts.controller import RolloutController
from control_plane.rollouts.leader import LeaderLock
from control_plane.services.auth import matching_secret
from control_plane.telemetry.rollup import RetentionPolicy, RollupJob
from control_plane.trust import releases
from shared.mqtt.client import MqttClient
from shared.mqtt.url import format_broker_url, parse_broker_url, parse_broker_urls
from shared.topics import Topics

if TYPE_CHECKING:
    from control_plane.fleet.jetstream import JetStreamIngest

log = logging.getLogger("slmops.fleet")
CONTROL_PLANE_USER = "slmops-control-plane"


class FleetRuntime:
    def __init__(self, settings: Settings, engine: sa.Engine, publish_tuning: PublishTuning | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = Topics(settings.mqtt_topic_prefix)
        self.controller = RolloutController()
        self.ingest = IngestWriter(engine)
        self.leader = LeaderLock(engine, settings.data_dir)
        self.desired = Publisher(engine, self.topics, publish_tuning, leading=lambda: self.leader.held)
        # Rollups run where the controller runs: one replica writes them, so inserts never collide.
        policy = RetentionPolicy.from_settings(settings)
        self.rollups = RollupJob(engine, policy, settings.telemetry_rollup_interval_s, lambda: self.leader.held)
        self.broker: EmbeddedBroker | None = None
        self.client: MqttClient | None = None  # ingest: subscriptions in a persistent session
        self.publisher: MqttClient | None = None  # desired states
        self.subscriber: DeviceMessageSubscriber | JetStreamIngest | None = None
        self.device_mqtt_url: str | None = None
        self._cp_password = secrets.token_urlsafe(24)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._tick_now = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_resign = 0.0  # monotonic time of the next look for releases to re-sign

    def start(self) -> None:
        url = self._start_broker()
        # A stable client id and a persistent session: what devices send while the control plane
        # restarts waits in the broker instead of being lost. Bound to the control plane's broker
        # password, so no device can name (and take over) the session.
        protocol, label = self.settings.mqtt_protocol, self.settings.mqtt_client_id
        secret = parse_broker_urls(url)[0].password
        client_id = client_id_for(label, secret)
        tls = self._broker_tls_context()
        if self.settings.ingest_source == "jetstream":
            self.subscriber = self._jetstream_ingest(label)
            self.subscriber.start()
        else:
            self.client = MqttClient(
                url, client_id=client_id, protocol=protocol, persistent_session=True, tls_context=tls
            )
            # One journal per broker session (replicas may share a data dir; each has its client id).
            journal_dir = self.settings.data_dir / "ingest-journal" / re.sub(r"[^A-Za-z0-9_.-]", "_", label)
            journal = IngestJournal(journal_dir) if self.settings.ingest_journal else None
            self.subscriber = DeviceMessageSubscriber(
                self.client, self.topics, self.ingest, share_group=self.settings.mqtt_ingest_group, journal=journal
            )
            self.subscriber.start()
            self.client.start(wait=True, timeout_s=15)
        # Publishing on its own connection: the ingest connection's network thread also stores the
        # batches it reads, and a publish_many waiting for PUBACKs must not queue behind that.
        self.publisher = MqttClient(
            url, client_id=client_id_for(f"{label}-pub", secret), protocol=protocol, tls_context=tls
        )
        self.publisher.start(wait=True, timeout_s=15)
        self._thread = threading.Thread(target=self._loop, name="slmops-controller", daemon=True)
        self._thread.start()
        self.rollups.start()

    def _jetstream_ingest(self, label: str) -> JetStreamIngest:
        """Device messages from the JetStream stream, through the consumer every replica shares."""
        from control_plane.fleet.jetstream import JetStreamIngest  # nats-py: the `nats` extra

        return JetStreamIngest(
            list(self.settings.ingest_nats_urls),
            self.topics,
            self.ingest,
            stream=self.settings.ingest_stream,
            durable=self.settings.ingest_consumer,
            stream_replicas=self.settings.ingest_stream_replicas,
            name=label,
        )

    def _broker_tls_context(self) -> ssl.SSLContext | None:
        """Verification of an mqtts:// broker against SLMOPS_MQTT_CA_FILE; None: the system store."""
        ca_file = self.settings.mqtt_ca_file
        return ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    def _start_broker(self) -> str:
        if self.settings.mqtt_url:
            self.device_mqtt_url = self.settings.device_mqtt_url or _without_credentials(self.settings.mqtt_url)
            return self.settings.mqtt_url
        self.broker = EmbeddedBroker(
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            auth=self._check_password,
            topics=self.topics,
            admin_users=frozenset({CONTROL_PLANE_USER}),
            # Devices get TLS with the server's own certificate; this process, the loopback listener.
            tls=self.settings.tls_files,
        )
        self.broker.start()
        self.device_mqtt_url = self.settings.device_mqtt_url or self.broker.url
        local = parse_broker_url(self.broker.local_url)
        return f"mqtt://{CONTROL_PLANE_USER}:{quote(self._cp_password)}@{local.host}:{local.port}"

    def _check_password(self, username: str, password: str) -> bool:
        if username == CONTROL_PLANE_USER:
            return secrets.compare_digest(password, self._cp_password)
        with Session(self.engine) as session:
            # A staged secret is not yet the device's: its first HTTP request completes the rotation.
            return matching_secret(session.get(Device, username), password) in ("current", "previous")

    def wake(self, *, tick: bool = True) -> None:
        """Publish what an API change wrote now instead of at the next tick; with `tick`, run the
        controller now too."""
        if tick:
            self._tick_now.set()
        self._wake.set()

    def _loop(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            timeout_s = self.settings.controller_tick_s
            try:
                if self.leader.try_acquire():
                    # What an API call just wrote (a new rollout's first stage, the states an abort
                    # restores) goes out first: the tick's gate evaluations can wait, devices should not.
                    self._publish_logged("before the controller tick")
                    # A wake that only publishes (a new rollout) skips the tick until it is due: the
                    # tick has nothing to decide before devices act, and it would compete with
                    # ingesting their acknowledgements (docs/performance.md#controller-ticks).
                    if self._tick_now.is_set() or time.monotonic() >= next_tick:
                        self._tick_now.clear()
                        self._tick()
                        # A full interval after the tick ends, however long it took: a slow tick
                        # (a large fleet under ingest load) must not run back to back.
                        next_tick = time.monotonic() + self.settings.controller_tick_s
                    timeout_s = max(0.0, next_tick - time.monotonic())
            except Exception:  # the loop must survive a database blip; the next tick retries
                log.exception("controller tick failed")
            self._wake.wait(timeout_s)
            self._wake.clear()

    def _tick(self) -> None:
        started = time.perf_counter()
        with Session(self.engine, expire_on_commit=False) as session:
            self.controller.tick(session)
        self._resign_due()
        self._publish_logged(f"after a controller tick of {time.perf_counter() - started:.3f} s")

    def _resign_due(self) -> None:
        """Re-sign releases in the last half of their life, checked ten times a life (at most a minute apart)."""
        signer = releases.current()
        if signer is None or time.monotonic() < self._next_resign:
            return
        self._next_resign = time.monotonic() + min(60.0, signer.expiry_s / 10)
        with Session(self.engine) as session:
            resign.resign_due(session, signer)
            session.commit()

    def _publish_logged(self, when: str) -> None:
        started = time.perf_counter()
        if sent := self.publish_pending():
            log.info("published %d desired states in %.3f s (%s)", sent, time.perf_counter() - started, when)

    def handing_over(self, states: dict[str, dict[str, Any]]) -> AbstractContextManager[None]:
        """Around the commit of desired states an API request wrote: see Publisher.handing_over."""
        return self.desired.handing_over(states)

    def publish_pending(self) -> int:
        """Send the desired states not yet acknowledged by the broker, holding ingest meanwhile."""
        hold = self.subscriber.held if self.subscriber is not None else None
        return self.desired.publish_pending(self.publisher, hold)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.rollups.stop()
        # Disconnect first, then store what gathered: a message read after the last flush would
        # otherwise be acknowledged to the broker and never written.
        if self.client is not None:
            self.client.stop(publish_offline=False)
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.publisher is not None:
            self.publisher.stop(publish_offline=False)
        if self.broker is not None:
            self.broker.stop()
        self.leader.release()


def _without_credentials(urls: str) -> str:
    return ",".join(format_broker_url(url.with_credentials(None, None)) for url in parse_broker_urls(urls))
