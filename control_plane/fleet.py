"""The control plane's fleet side: broker connection, ingest, publisher and the controller loop.

FleetRuntime.start()
  -> embedded amqtt broker (no SLMOPS_MQTT_URL) or the external broker
  -> DeviceMessageSubscriber -> IngestWriter (SQL, in batches)
  -> controller thread: if leader, RolloutController.tick() then publish pending desired states
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
from urllib.parse import quote

import paho.mqtt.client as paho
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.config import Settings
from control_plane.ingest import IngestWriter
from control_plane.leader import LeaderLock
from control_plane.models import Device
from control_plane.rollouts import assign
from control_plane.rollouts.controller import RolloutController
from control_plane.security import verify_secret
from control_plane.telemetry.rollup import RetentionPolicy, RollupJob
from shared.topics import Topics
from slmops.mqtt.broker import EmbeddedBroker
from slmops.mqtt.client import MqttClient, Outgoing
from slmops.mqtt.subscriber import DeviceMessageSubscriber

log = logging.getLogger("slmops.fleet")
CONTROL_PLANE_USER = "slmops-control-plane"
PUBLISH_BATCH = 2000  # desired states read and queued at a time
PUBLISH_AHEAD = 4  # batches queued beyond the one whose PUBACKs are awaited (bounds what paho holds)
MARK_EVERY = 20_000  # acknowledged states marked published at least this often


class FleetRuntime:
    def __init__(self, settings: Settings, engine: sa.Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.topics = Topics(settings.mqtt_topic_prefix)
        self.controller = RolloutController()
        self.ingest = IngestWriter(engine)
        self.leader = LeaderLock(engine, settings.data_dir)
        # Rollups run where the controller runs: one replica writes them, so inserts never collide.
        policy = RetentionPolicy.from_settings(settings)
        self.rollups = RollupJob(engine, policy, settings.telemetry_rollup_interval_s, lambda: self.leader.held)
        self.broker: EmbeddedBroker | None = None
        self.client: MqttClient | None = None  # ingest: subscriptions in a persistent session
        self.publisher: MqttClient | None = None  # desired states
        self.subscriber: DeviceMessageSubscriber | None = None
        self.device_mqtt_url: str | None = None
        self._cp_password = secrets.token_urlsafe(24)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._tick_now = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        url = self._start_broker()
        # A stable client id and a persistent session: what devices send while the control plane
        # restarts waits in the broker instead of being lost.
        protocol, client_id = self.settings.mqtt_protocol, self.settings.mqtt_client_id
        self.client = MqttClient(url, client_id=client_id, protocol=protocol, persistent_session=True)
        self.subscriber = DeviceMessageSubscriber(
            self.client, self.topics, self.ingest, share_group=self.settings.mqtt_ingest_group
        )
        self.subscriber.start()
        self.client.start(wait=True, timeout_s=15)
        # Publishing on its own connection: the ingest connection's network thread also stores the
        # batches it reads, and a publish_many waiting for PUBACKs must not queue behind that.
        self.publisher = MqttClient(url, client_id=f"{client_id}-pub", protocol=protocol)
        self.publisher.start(wait=True, timeout_s=15)
        self._thread = threading.Thread(target=self._loop, name="slmops-controller", daemon=True)
        self._thread.start()
        self.rollups.start()

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
        )
        self.broker.start()
        self.device_mqtt_url = self.settings.device_mqtt_url or self.broker.url
        return f"mqtt://{CONTROL_PLANE_USER}:{quote(self._cp_password)}@{self.settings.mqtt_host}:{self.broker.port}"

    def _check_password(self, username: str, password: str) -> bool:
        if username == CONTROL_PLANE_USER:
            return secrets.compare_digest(password, self._cp_password)
        with Session(self.engine) as session:
            device = session.get(Device, username)
            return device is not None and verify_secret(password, device.secret_hash)

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
                    # ingesting their acknowledgements (a third of the server's CPU at 10,000 devices).
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
        self._publish_logged(f"after a controller tick of {time.perf_counter() - started:.3f} s")

    def _publish_logged(self, when: str) -> None:
        started = time.perf_counter()
        if sent := self.publish_pending():
            log.info("published %d desired states in %.3f s (%s)", sent, time.perf_counter() - started, when)

    def publish_pending(self) -> int:
        """Send desired states not yet acknowledged by the broker (retained, QoS 1), all of them,
        in batches: a 10,000-device stage goes out now, not one batch per controller tick.

        Batches are read in device-id order and queued back to back, up to PUBLISH_AHEAD of them
        waiting for the broker's PUBACKs, so the broker never waits for the database: marking
        each batch before reading the next had left it idle for as long as it spent publishing.
        What the broker acknowledged is marked published once at the end (and every MARK_EVERY
        states): a crash before that sends those states again, which devices ignore (message
        ids). A state written meanwhile for a device already passed goes out on the next call."""
        publisher = self.publisher
        sent, after = 0, None
        # Queued batches whose PUBACKs are not waited on yet: (device id, message id)s, publish_all's infos.
        waiting: collections.deque[tuple[list[tuple[str, str]], list[tuple[str, paho.MQTTMessageInfo]]]]
        waiting = collections.deque()
        acked: list[tuple[str, str]] = []  # acknowledged by the broker, not marked yet
        with contextlib.ExitStack() as hold:
            while publisher is not None and publisher.connected:
                with Session(self.engine) as session:
                    rows = assign.pending_publication(session, limit=PUBLISH_BATCH, after=after)
                last = len(rows) < PUBLISH_BATCH
                if rows:
                    if sent == 0 and self.subscriber is not None:
                        # Ingest waits until every batch is out, not between them (see held()).
                        hold.enter_context(self.subscriber.held())
                    queued = publisher.publish_all(
                        Outgoing(self.topics.desired(device_id), payload.encode(), qos=1, retain=True)
                        for device_id, _, payload in rows
                    )
                    waiting.append(([(device_id, message_id) for device_id, message_id, _ in rows], queued))
                    sent += len(rows)
                    after = rows[-1][0]
                while waiting and (last or len(waiting) > PUBLISH_AHEAD):
                    published, queued = waiting.popleft()
                    publisher.wait_published(queued, timeout_s=60)
                    acked.extend(published)
                if len(acked) >= MARK_EVERY or (last and acked):
                    if last:
                        hold.close()  # all out: the devices' acknowledgements are stored before the bookkeeping
                    self._mark(acked)
                    acked = []
                if last:
                    break
        return sent

    def _mark(self, published: list[tuple[str, str]]) -> None:
        with Session(self.engine) as session:
            assign.mark_published(session, published)
            session.commit()

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


def _without_credentials(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
