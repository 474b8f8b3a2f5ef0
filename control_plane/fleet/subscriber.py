"""The control plane's ingest side: every device message under the prefix, decoded, in batches.

Messages are decoded on paho's network thread as they arrive (malformed ones counted by reason and
logged with the device id, QoS 1 redeliveries dropped by message id) and gathered into a batch;
the batch goes to a writer thread once `max_batch` have gathered, or `max_delay_s` after its first
message (a flusher thread watches the clock). The writer calls the handler, one batch at a time in
arrival order, so the handler can write one SQL transaction per batch.

The hand-off is per batch, never per message, so the two threads do not trade the GIL for each
message (ADR 0008); while the writer waits on the database the network thread decodes the next
batch. The writer takes the batches queued behind the one it picks up into the same call (about
`max_write` messages), so under load
a transaction grows to what arrived during the last one. What a hold (`held()`) put aside goes
over in batches of `max_write` at its end. At most PENDING_BATCHES batches wait for
the writer; beyond that the network thread waits too and paho reads nothing more, so the broker holds
the rest (TCP backpressure) and nothing is lost. A client used for ingest should not also wait for
PUBACKs of its own publishes (the control plane publishes on a second connection). With an
`IngestJournal`, every message is journaled before its PUBACK leaves and forgotten once stored, so
what was acknowledged and not yet stored is ingested again after a crash (`start()` replays it).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel

from control_plane.fleet.journal import IngestJournal
from shared.messages import MessageDecodeError, decode, message_id_of
from shared.mqtt.client import MqttClient
from shared.mqtt.dedup import RecentIds
from shared.mqtt.errors import UnstorableBatch
from shared.topics import TopicKind, Topics

log = logging.getLogger(__name__)
PENDING_BATCHES = 8  # batches decoded and waiting for the writer; bounds memory, keeps backpressure
MAX_HELD = 100_000  # messages `held()` puts aside; at this many the hold ends early
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # pauses before a failed batch is handed over again
ISOLATE_CALLS = 64  # handler calls spent halving a batch that keeps failing (finds a few bad messages in 2,000)


@dataclass(frozen=True)
class DeviceMessage:
    device_id: str
    kind: TopicKind
    message: BaseModel  # the model `shared.messages.model_for(kind)` names
    topic: str
    received_at: datetime
    seq: int = 0  # its number in the ingest journal (0 without one)


BatchHandler = Callable[[list[DeviceMessage]], None]


@dataclass
class IngestCounters:
    received: int = 0
    dispatched: int = 0
    duplicates: int = 0
    unknown_topics: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by MessageDecodeError.reason
    batches: int = 0
    handler_errors: int = 0  # failed handler calls, retries included
    lost: int = 0  # messages no handler call took, after the retries and halving
    unstorable: int = 0  # messages the handler refused alone as never storable (UnstorableBatch)
    replayed: int = 0  # messages taken again from the ingest journal after a crash
    journal_errors: int = 0  # bursts the journal could not write

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class DeviceMessageSubscriber:
    """Subscribe with `client` to everything devices publish under `topics` and feed `handler`."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        handler: BatchHandler,
        *,
        max_batch: int = 500,
        max_write: int = 2000,
        max_delay_s: float = 0.01,
        dedup: RecentIds | None = None,
        kinds: tuple[TopicKind, ...] | None = None,
        share_group: str | None = None,
        journal: IngestJournal | None = None,
    ) -> None:
        self.client = client
        self.topics = topics
        self.counters = IngestCounters()
        self._handler = handler
        self._max_batch = max_batch
        self._max_write = max(max_write, max_batch)
        self._max_delay_s = max_delay_s
        self._dedup = dedup if dedup is not None else RecentIds(65536)
        self._kinds = kinds
        self._share_group = share_group
        self._journal = journal  # what was acknowledged and not stored yet survives a crash there
        self._batch: list[DeviceMessage] = []
        self._batch_started = 0.0
        self._batch_lock = threading.Lock()  # guards _batch; held only to append or swap
        self._write_lock = threading.Lock()  # one batch handed over at a time, in arrival order
        self._pending: queue.Queue[list[DeviceMessage] | None] = queue.Queue(maxsize=PENDING_BATCHES)
        self._stop = threading.Event()
        self._gathering = threading.Event()  # set while a batch has messages (wakes the flusher)
        self._flusher: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._hold_lock = threading.Lock()  # guards _holding, _draining and _held
        self._holding = False
        self._draining = False
        self._held: list[tuple[str, bytes, datetime, int]] = []
        self._drain_lock = threading.Lock()  # one thread drains at a time: arrival order is kept

    def start(self) -> None:
        """Start the flusher and register the subscriptions (restored by the client on reconnect)."""
        self._stop.clear()
        self._writer = threading.Thread(target=self._write_batches, name="slmops-mqtt-ingest-writer", daemon=True)
        self._writer.start()
        self._flusher = threading.Thread(target=self._flush_when_due, name="slmops-mqtt-ingest", daemon=True)
        self._flusher.start()
        if self._journal is not None:
            self.client.add_read_burst_hook(self._write_journal)
            self._replay(self._journal)
        filters = (
            [self.topics.all_devices(k) for k in self._kinds]
            if self._kinds
            else self.topics.control_plane_subscriptions()
        )
        if self._share_group:
            # Replicas in one group each get a share of the device messages instead of all of them.
            filters = [f"$share/{self._share_group}/{f}" for f in filters]
        for topic_filter in filters:
            self.client.subscribe(topic_filter, self._receive, qos=1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Hand over what has gathered, let the writer store every batch, then stop both threads."""
        if self._flusher is None:
            return
        self._stop.set()
        self._gathering.set()
        self._flusher.join(timeout_s)
        self._flusher = None
        self._flush()
        self._pending.put(None)
        if self._writer is not None:
            self._writer.join(timeout_s)
            self._writer = None
        if self._journal is not None:
            self._journal.close()

    def _replay(self, journal: IngestJournal) -> None:
        """Ingest what the journal holds from before a crash (acknowledged, never stored), in order,
        before the client connects: a redelivery of the same message is then a duplicate."""
        replayed = 0
        for record in journal.unstored():
            self._accept(record.topic, record.payload, record.received_at, record.seq)
            replayed += 1
        if replayed:
            self.counters.replayed += replayed
            log.warning("ingesting %d messages acknowledged before a crash and not stored then", replayed)

    def _write_journal(self) -> None:
        assert self._journal is not None
        try:
            self._journal.flush()
        except OSError:
            # Ingest goes on; only what this burst held is unprotected should the process die now.
            self.counters.journal_errors += 1
            log.exception("the ingest journal could not be written")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """While the block runs, put arriving messages aside undecoded; decode and store them,
        in arrival order, when it ends (on the caller's thread).

        The control plane holds ingest while it publishes a stage: the acknowledgements that start
        coming back at once would otherwise take turns with the publisher for the interpreter and
        the database, and every device would wait longer for its desired state. Messages are
        still read and acknowledged to the broker meanwhile, so none wait in the broker's queue
        (Mosquitto's and EMQX's default bound it at 1,000 per client, then drop; ADR 0008). At most MAX_HELD
        are put aside (the hold ends early at that many); with a journal (`IngestJournal`) a crash
        inside the block loses none of them, as it loses none of the batches waiting for the
        writer, and without one it loses them all."""
        with self._hold_lock:
            self._holding = True
        try:
            yield
        finally:
            self._drain()

    def _drain(self) -> None:
        """End the hold and decode what it put aside, including what arrives meanwhile."""
        with self._drain_lock:
            with self._hold_lock:
                self._holding, self._draining = False, True
            while True:
                with self._hold_lock:
                    if not self._held:
                        self._draining = False  # under the lock: later messages are decoded as they come
                        return
                    held, self._held = self._held, []
                self._accept_all(held)

    def _accept_all(self, held: list[tuple[str, bytes, datetime, int]]) -> None:
        """Decode what a hold put aside and hand it over in batches of up to `max_write`, after
        the batch gathering now: one transaction for a 1,000-device stage's acknowledgements
        instead of one per `max_batch` (the flusher cuts a batch 10 ms after its first message,
        and decoding them takes longer than that; ADR 0008)."""
        decoded: list[DeviceMessage] = []
        for topic, payload, received_at, seq in held:
            self.counters.received += 1
            if (message := self._decode(topic, payload, received_at, seq)) is not None:
                decoded.append(message)
        step = self._max_write
        with self._write_lock:
            with self._batch_lock:
                batches, self._batch = [self._batch], []
            batches += [decoded[i : i + step] for i in range(0, len(decoded), step)]
            for batch in batches:
                if batch:
                    self._pending.put(batch)  # waits while PENDING_BATCHES are queued: backpressure

    def _receive(self, topic: str, payload: bytes) -> None:
        """paho's on_message, on its network thread."""
        received_at = datetime.now(UTC)
        # Journaled before anything else: paho acknowledges the message once this returns.
        seq = self._journal.record(topic, payload, received_at) if self._journal is not None else 0
        if self._holding or self._draining:
            with self._hold_lock:
                room = len(self._held) < MAX_HELD
                if (self._holding or self._draining) and room:
                    self._held.append((topic, payload, received_at, seq))
                    return
            if not room:
                self._drain()  # after everything put aside before this message
        self._accept(topic, payload, received_at, seq)

    def _accept(self, topic: str, payload: bytes, received_at: datetime, seq: int = 0) -> None:
        self.counters.received += 1
        decoded = self._decode(topic, payload, received_at, seq)
        if decoded is None:
            return
        with self._batch_lock:
            if not self._batch:
                self._batch_started = time.monotonic()
                self._gathering.set()
            self._batch.append(decoded)
            full = len(self._batch) >= self._max_batch
        if full:
            self._flush()

    def _flush_when_due(self) -> None:
        """Sleeps while nothing gathers; hands over a batch that waited `max_delay_s` for company."""
        while self._gathering.wait() and not self._stop.is_set():
            with self._batch_lock:
                if not self._batch:
                    self._gathering.clear()  # under the lock: _receive sets it again with the next message
                    continue
                wait_s = self._batch_started + self._max_delay_s - time.monotonic()
            if wait_s > 0:
                self._stop.wait(wait_s)
            else:
                self._flush()

    def _flush(self) -> None:
        with self._write_lock:
            with self._batch_lock:
                batch, self._batch = self._batch, []
            if batch:
                self._pending.put(batch)  # waits while PENDING_BATCHES are queued: backpressure

    def _write_batches(self) -> None:
        """Hand each batch to the handler together with the batches queued behind it (until the
        call holds `max_write` messages, so at most `max_write + max_batch - 1`; still in arrival
        order): under load, one transaction takes what arrived during the last one, since
        per-transaction costs bound the rate of small batches (ADR 0008)."""
        stopping = False
        while not stopping and (batch := self._pending.get()) is not None:
            while len(batch) < self._max_write:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            self._dispatch(batch)

    def _decode(self, topic: str, payload: bytes, received_at: datetime, seq: int = 0) -> DeviceMessage | None:
        """Decode one message; None (counted, logged) if it is unknown, malformed or a redelivery."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            self.counters.unknown_topics += 1
            log.warning("dropping a message on unknown topic %s", topic)
            return None
        try:
            message = decode(parsed.kind, payload)
        except MessageDecodeError as exc:
            self.counters.malformed[exc.reason] += 1
            log.warning("dropping a malformed %s message from device %s: %s", parsed.kind, parsed.device_id, exc)
            return None
        message_id = message_id_of(message)
        if message_id is not None and not self._dedup.first_time(f"{parsed.device_id}/{message_id}"):
            self.counters.duplicates += 1
            return None
        return DeviceMessage(parsed.device_id, parsed.kind, message, topic, received_at, seq)

    def _dispatch(self, batch: list[DeviceMessage]) -> None:
        """Hand `batch` to the handler; a failing one is tried again after each of RETRY_DELAYS_S
        (a database restart or a deadlock passes), then in halves (`_isolate`); one that raises
        `UnstorableBatch` goes to halves at once. The messages are acknowledged to the broker
        already: what the handler never takes is counted (`lost`, or `unstorable` for a message
        refused alone as such) and logged with the device ids."""
        self.counters.batches += 1
        for delay_s in (*RETRY_DELAYS_S, None):
            try:
                self._handler(batch)
            except UnstorableBatch as exc:
                self.counters.handler_errors += 1
                self._isolate(batch, budget=[ISOLATE_CALLS], error=exc)
                break
            except Exception as exc:
                self.counters.handler_errors += 1
                log.exception("ingest batch handler failed on %d messages", len(batch))
                if delay_s is None:
                    self._isolate(batch, budget=[ISOLATE_CALLS], error=exc)
                else:
                    time.sleep(delay_s)  # the writer's thread: paho reads on, backpressure bounds it
                continue
            self.counters.dispatched += len(batch)
            break
        if self._journal is not None and batch:
            self._journal.stored_up_to(batch[-1].seq)  # batches come in arrival order

    def _isolate(self, batch: list[DeviceMessage], budget: list[int], error: Exception) -> None:
        """Store what the handler takes of a batch it keeps refusing, half by half, so one message
        it cannot store (a value the database rejects) costs only itself, not its batch. Halves
        refused with `UnstorableBatch` are split further at no cost (each split makes progress, so
        at most 2n calls); other refusals spend `budget` (a database that stays down refuses every half)."""
        if len(batch) == 1 or budget[0] <= 0:
            self._lose(batch, error)
            return
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            if budget[0] <= 0:
                self._lose(part, error)
                continue
            try:
                self._handler(part)
            except UnstorableBatch as exc:
                self.counters.handler_errors += 1
                self._isolate(part, budget, exc)
            except Exception as exc:
                budget[0] -= 1
                self.counters.handler_errors += 1
                self._isolate(part, budget, exc)
            else:
                self.counters.dispatched += len(part)

    def _lose(self, batch: list[DeviceMessage], error: Exception) -> None:
        devices = sorted({m.device_id for m in batch})
        shown = ", ".join(devices[:10]) + (f" and {len(devices) - 10} more" if len(devices) > 10 else "")
        if len(batch) == 1 and isinstance(error, UnstorableBatch):
            self.counters.unstorable += 1
            log.warning("refused a %s message from device %s that cannot be stored: %s", batch[0].kind, shown, error)
            return
        self.counters.lost += len(batch)
        log.error("ingest lost %d messages the handler kept refusing, from devices %s", len(batch), shown)
