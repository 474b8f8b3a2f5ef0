"""Ingest from a JetStream stream through one durable pull consumer that every replica shares.

    devices --MQTT--> nats-server (topic a/b/c is subject a.b.c) --> stream (work queue)
        --> durable pull consumer --> replica 1 .. replica N: fetch, decode, store, then ack

NATS delivers each stream message to one of the replicas fetching from the consumer, so the work
splits across replicas with no shared-subscription group. A message is acknowledged only after the
transaction that stores it commits: a replica that dies (kill -9 included) leaves its fetched
messages unacknowledged, and NATS hands them to a replica still fetching once `ack_wait_s` passes.
Stored twice is harmless: telemetry windows and events are unique per (device, message id) in the
database, and a redelivered state or status is acknowledged without being applied while a newer
one of the same device is still in the stream (it would roll the device back; once the newer one
is stored and acknowledged the work queue has dropped it, and the older one applies). See
docs/adr/0011-jetstream-ingest.md for the comparison with the MQTT path.

One thread runs an asyncio loop with two tasks: the fetcher decodes batches into a short queue
while the writer stores the previous one on a worker thread (the handler is blocking SQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from control_plane.fleet.batch_writer import RETRY_DELAYS_S, BatchHandler
from control_plane.fleet.decode import DeviceMessage, IngestCounters, MessageDecoder, dedup_key
from shared.mqtt.dedup import RecentIds
from shared.mqtt.errors import UnstorableBatch
from shared.topics import DEVICE_PUBLISHED_KINDS, TopicKind, Topics

log = logging.getLogger(__name__)
PENDING_BATCHES = 2  # fetched and decoded batches waiting for the writer; the rest waits in the stream
REDELIVER_AFTER_FAILURE_S = 5.0  # a batch the database keeps refusing comes back this much later
_LATEST_WINS = frozenset({TopicKind.STATE, TopicKind.STATUS})  # applied as "the device is now ..."
Fetched = list[tuple[Any, DeviceMessage]]  # (the JetStream message, what it decoded to)


def subject_of(topic: str) -> str:
    """The NATS subject nats-server's MQTT listener publishes an MQTT topic on: `/` separates
    tokens, and a `.` inside a level becomes `//` (nats-server mqttToNATSSubjectConversion)."""
    return ".".join(level.replace(".", "//") for level in topic.split("/"))


def topic_of(subject: str) -> str:
    """The MQTT topic a device published a subject on (the inverse of `subject_of`)."""
    return "/".join(token.replace("//", ".") for token in subject.split("."))


def stream_subjects(topics: Topics) -> list[str]:
    """What the stream captures: every kind a device publishes, for any device (not `desired`)."""
    return [subject_of(topics.all_devices(kind)).replace("+", "*") for kind in DEVICE_PUBLISHED_KINDS]


class JetStreamIngest:
    """Fetch device messages from `stream` through the durable consumer `durable` and feed `handler`
    (the same batch handler the MQTT subscriber feeds); `start()`, `held()`, `stop()` like it."""

    def __init__(
        self,
        servers: list[str],
        topics: Topics,
        handler: BatchHandler,
        *,
        stream: str = "SLMOPS_DEVICES",
        durable: str = "slmops-ingest",
        max_batch: int = 1000,
        max_write: int = 4000,
        ack_wait_s: float = 30.0,
        max_ack_pending: int = 20_000,
        stream_replicas: int = 1,
        dedup: RecentIds | None = None,
        name: str = "slmops-ingest",
    ) -> None:
        self.servers = servers
        self.topics = topics
        self.stream = stream
        self.durable = durable
        self.counters = IngestCounters()
        self._handler = handler
        self._max_batch = max_batch
        self._max_write = max(max_write, max_batch)
        self._ack_wait_s = ack_wait_s
        self._max_ack_pending = max_ack_pending
        self._stream_replicas = stream_replicas
        self._dedup = dedup if dedup is not None else RecentIds(65536)
        self._decode = MessageDecoder(topics, self.counters, self._dedup)
        self._name = name
        self._holds = 0  # held() blocks open; the fetcher waits while any is
        self._holds_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        """Connect, create the stream and the consumer if missing, and start fetching; raises
        what stopped it if it cannot within `timeout_s`."""
        self._thread = threading.Thread(target=self._run, name="slmops-jetstream-ingest", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._failure is not None:
            self.stop()
            hosts = ", ".join(url.rpartition("@")[2] for url in self.servers)  # no credentials in logs
            raise RuntimeError(f"JetStream ingest did not start on {hosts}") from self._failure

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store and acknowledge what was fetched, then close the connection."""
        if self._thread is None:
            return
        if self._thread.is_alive() and self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        self._thread = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Fetch nothing while the block runs (the control plane publishes a stage meanwhile);
        what devices send waits in the stream, which bounds it, not this process."""
        with self._holds_lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._holds_lock:
                self._holds -= 1

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start(); after it, logged
            self._failure = exc
            log.exception("JetStream ingest stopped")
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        nc = await nats.connect(
            servers=self.servers,
            name=self._name,
            max_reconnect_attempts=-1,  # the server comes back (or another of the URLs answers)
            reconnect_time_wait=0.5,
            error_cb=_log_connection_error,
            disconnected_cb=self._log_disconnected,
        )
        try:
            js = nc.jetstream()
            while True:
                try:
                    await self._ensure_stream(js)
                    break
                except APIError as exc:  # a cluster still forming: "no suitable peers for placement"
                    log.warning("JetStream not ready for the ingest stream (%s); asking again", exc.description)
                    if self._stopping.is_set():
                        return
                    await asyncio.sleep(1.0)
            sub = await js.pull_subscribe_bind(self.durable, self.stream)
            batches: asyncio.Queue[Fetched | None] = asyncio.Queue(maxsize=PENDING_BATCHES)
            self._ready.set()
            writer = asyncio.create_task(self._write_batches(js, batches))
            await self._fetch_batches(js, sub, batches)
            await batches.put(None)
            await writer
            await nc.flush()  # the last acknowledgements reach the server before the connection ends
        finally:
            await nc.close()  # not drain(): a pull subscription's drain waits forever (nats-py 2.16)

    async def _log_disconnected(self) -> None:
        if self._stopping is not None and not self._stopping.is_set():  # not our own close()
            log.warning("disconnected from NATS; reconnecting (unacknowledged messages come back to a replica)")

    async def _ensure_stream(self, js: Any) -> None:
        """The stream and the consumer as configured, created by whichever replica starts first."""
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            # Work-queue retention: a message leaves the stream once acknowledged (stored).
            config = StreamConfig(
                name=self.stream,
                subjects=stream_subjects(self.topics),
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=self._stream_replicas,  # R3 on a cluster: a node's loss loses no message
            )
            await js.add_stream(config)
        try:
            await js.consumer_info(self.stream, self.durable)
            return  # bound as it is: its settings are changed on the server, not by a starting replica
        except NotFoundError:
            pass
        await js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,  # AckAll would acknowledge another replica's messages
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._ack_wait_s,
                max_ack_pending=self._max_ack_pending,
                max_deliver=-1,
            ),
        )

    async def _fetch_batches(self, js: Any, sub: Any, batches: asyncio.Queue[Fetched | None]) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            if self._holds:
                await asyncio.sleep(0.005)
                continue
            try:
                msgs = await sub.fetch(self._max_batch, timeout=0.5)
            except TimeoutError:  # nothing came (nats-py raises its own subclass or asyncio's)
                continue
            except Exception:  # a reconnect in progress; the loop asks again
                log.warning("JetStream fetch failed; asking again", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            fetched = await self._decode_all(js, msgs)
            if fetched:
                await batches.put(fetched)  # waits while PENDING_BATCHES are queued: backpressure

    async def _decode_all(self, js: Any, msgs: list[Any]) -> Fetched:
        received_at = datetime.now(UTC)
        fetched: Fetched = []
        for msg in msgs:
            decoded = self._decode(topic_of(msg.subject), msg.data, received_at)
            if decoded is None or await self._superseded(js, msg, decoded):
                await msg.ack()  # never stored: nothing to wait for
                continue
            fetched.append((msg, decoded))
        return fetched

    async def _superseded(self, js: Any, msg: Any, decoded: DeviceMessage) -> bool:
        """A redelivered state or status with a newer one on its subject still in the stream:
        applying it would roll the device back (the newer one is stored by whichever replica holds it)."""
        if decoded.kind not in _LATEST_WINS or msg.metadata.num_delivered <= 1:
            return False
        try:
            latest = await js.get_last_msg(self.stream, msg.subject)
        except Exception:  # cannot tell: applying it is what the MQTT path would do
            return False
        if latest.seq > msg.metadata.sequence.stream:
            self.counters.superseded += 1
            return True
        return False

    async def _write_batches(self, js: Any, batches: asyncio.Queue[Fetched | None]) -> None:
        """Store each batch with the ones queued behind it (up to `max_write` messages), then ack."""
        stopping = False
        while not stopping and (batch := await batches.get()) is not None:
            while len(batch) < self._max_write and not batches.empty():
                more = batches.get_nowait()
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            await self._store(batch)

    async def _store(self, batch: Fetched) -> None:
        """Store `batch` (retried after each of RETRY_DELAYS_S); ack what committed, term what the
        database refuses alone, nak the rest for a later redelivery: nothing is dropped here."""
        self.counters.batches += 1
        for delay_s in (*RETRY_DELAYS_S, None):
            try:
                await asyncio.to_thread(self._handler, [m for _, m in batch])
            except UnstorableBatch:
                self.counters.handler_errors += 1
                await self._isolate(batch)
                return
            except Exception:
                self.counters.handler_errors += 1
                log.exception("ingest batch handler failed on %d messages", len(batch))
                if delay_s is not None:
                    await asyncio.sleep(delay_s)
                    continue
                await self._hand_back(batch)
                return
            self.counters.dispatched += len(batch)
            await _settle(batch, "ack")
            return

    async def _isolate(self, batch: Fetched) -> None:
        """Store a batch holding a value the database refuses half by half (each split makes
        progress: at most 2n calls), so the message costs only itself."""
        if len(batch) == 1:
            self.counters.unstorable += 1
            msg, decoded = batch[0]
            log.warning("refused a %s message from device %s that cannot be stored", decoded.kind, decoded.device_id)
            await msg.term()  # redelivering it cannot help
            return
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            try:
                await asyncio.to_thread(self._handler, [m for _, m in part])
            except UnstorableBatch:
                self.counters.handler_errors += 1
                await self._isolate(part)
            except Exception:
                self.counters.handler_errors += 1
                await self._hand_back(part)
            else:
                self.counters.dispatched += len(part)
                await _settle(part, "ack")

    async def _hand_back(self, batch: Fetched) -> None:
        """The database is not taking writes: NATS redelivers the batch later (to any replica)."""
        self.counters.handed_back += len(batch)
        for _, decoded in batch:
            message_id = getattr(decoded.message, "message_id", None)
            if message_id is not None:
                self._dedup.forget(dedup_key(decoded.device_id, message_id))
        await _settle(batch, "nak", delay=REDELIVER_AFTER_FAILURE_S)


async def _log_connection_error(exc: Exception) -> None:
    log.warning("NATS connection: %s", exc or type(exc).__name__)  # one line, not nats-py's traceback


async def _settle(batch: Fetched, how: str, **kwargs: float) -> None:
    """Acknowledge (or nak) every message of `batch`; a failure leaves it to NATS' ack_wait."""
    started = time.monotonic()
    for msg, _ in batch:
        try:
            await getattr(msg, how)(**kwargs)
        except Exception:  # disconnected: the message is redelivered and deduplicated
            log.warning("could not %s a JetStream message", how, exc_info=True)
            return
    log.debug("%s'd %d messages in %.3f s", how, len(batch), time.monotonic() - started)
