"""The control plane's ingest from MQTT: every device message under the prefix, decoded, in batches.

Three parts, one per module, each usable alone (ADR 0008 for why the hand-offs are per batch):
  paho's network thread -> `MessageDecoder` (decode, dedup) -> `Batcher` (max_batch / max_delay_s)
  -> `BatchWriter` (the writer thread: the handler, retries, halving) -> handler (one transaction)
This module is the MQTT source: the subscriptions, the hold (`held()`) and the ingest journal.
Messages are acknowledged to the broker as paho reads them; when the writer falls behind, the
network thread waits and paho reads nothing more, so the broker holds the rest (TCP backpressure).
A client used for ingest should not also wait for PUBACKs of its own publishes (the control plane
publishes on a second connection). With an `IngestJournal`, every message is journaled before
its PUBACK leaves and forgotten once stored, so what was acknowledged and not yet stored is
ingested again after a crash (`start()` replays it; ADR 0003).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from control_plane.fleet.batch_writer import RETRY_DELAYS_S, BatchHandler, BatchWriter
from control_plane.fleet.batching import Batcher
from control_plane.fleet.decode import DeviceMessage, IngestCounters, MessageDecoder
from control_plane.fleet.journal import IngestJournal
from shared.mqtt.client import MqttClient
from shared.mqtt.dedup import RecentIds
from shared.topics import TopicKind, Topics

__all__ = ["BatchHandler", "DeviceMessage", "DeviceMessageSubscriber", "IngestCounters"]
log = logging.getLogger(__name__)
MAX_HELD = 100_000  # messages `held()` puts aside; at this many the hold ends early
Held = tuple[str, bytes, datetime, int]  # topic, payload, received at, journal seq


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
        max_held: int = MAX_HELD,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        on_settled: Callable[[list[DeviceMessage]], None] | None = None,
    ) -> None:
        """`on_settled` hears of each batch once the handler stored it or gave up (after the journal forgets it)."""
        self.client = client
        self.topics = topics
        self.counters = IngestCounters()
        self.decoder = MessageDecoder(topics, self.counters, dedup)
        self._on_settled = on_settled
        write = max(max_write, max_batch)
        self.writer = BatchWriter(handler, self.counters, max_write=write, retry_delays_s=retry_delays_s,
                                  on_settled=self._settled)  # fmt: skip
        self.batcher = Batcher(self.writer.submit, max_batch=max_batch, max_delay_s=max_delay_s)
        self._max_write = max(max_write, max_batch)
        self._kinds = kinds
        self._share_group = share_group
        self._journal = journal  # what was acknowledged and not stored yet survives a crash there
        self._max_held = max_held
        self._started = False
        self._hold_lock = threading.Lock()  # guards _holding, _draining and _held
        self._holding = False
        self._draining = False
        self._held: list[Held] = []
        self._drain_lock = threading.Lock()  # one thread drains at a time: arrival order is kept

    def start(self) -> None:
        """Start the threads, replay the journal and register the subscriptions (restored by the
        client on reconnect)."""
        self.writer.start()
        self.batcher.start()
        self._started = True
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
        if not self._started:
            return
        self._started = False
        self.batcher.stop(timeout_s)
        self.writer.stop(timeout_s)
        if self._journal is not None:
            self._journal.close()

    def _settled(self, batch: list[DeviceMessage]) -> None:
        if self._journal is not None:  # batches settle in arrival order: forget up to the last message
            self._journal.stored_up_to(batch[-1].seq)
        if self._on_settled is not None:
            self._on_settled(batch)

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
        (Mosquitto's and EMQX's default bound it at 1,000 per client, then drop; ADR 0008). At most
        `max_held` are put aside (the hold ends early at that many); with a journal a crash
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

    def _accept_all(self, held: list[Held]) -> None:
        """Decode what a hold put aside and hand it over in batches of up to `max_write`, after the
        batch gathering now: one transaction for a stage's acknowledgements, not one per `max_batch`."""
        decoded = [m for m in (self.decoder(*record) for record in held) if m is not None]
        step = self._max_write
        self.batcher.flush_then(decoded[i : i + step] for i in range(0, len(decoded), step))

    def _receive(self, topic: str, payload: bytes) -> None:
        """paho's on_message, on its network thread."""
        received_at = datetime.now(UTC)
        # Journaled before anything else: paho acknowledges the message once this returns.
        seq = self._journal.record(topic, payload, received_at) if self._journal is not None else 0
        if self._holding or self._draining:
            with self._hold_lock:
                room = len(self._held) < self._max_held
                if (self._holding or self._draining) and room:
                    self._held.append((topic, payload, received_at, seq))
                    self.counters.held += 1
                    return
            if not room:
                self._drain()  # after everything put aside before this message
        self._accept(topic, payload, received_at, seq)

    def _accept(self, topic: str, payload: bytes, received_at: datetime, seq: int = 0) -> None:
        if (message := self.decoder(topic, payload, received_at, seq)) is not None:
            self.batcher.add(message)
