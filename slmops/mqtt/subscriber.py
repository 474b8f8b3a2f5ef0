"""The control plane's ingest side: every device message under the prefix, decoded, in batches.

paho's network thread only enqueues raw messages; a worker thread decodes them, drops the
malformed ones (counted by reason, logged with the device id), drops QoS 1 redeliveries by
message id, and calls the batch handler with up to `max_batch` messages or whatever arrived
within `max_delay_s` of the first one, so the handler can write one SQL transaction per batch.
The delay is short: batches grow by themselves while the handler is busy, and an acknowledgement
should reach the database in milliseconds, not wait for company.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from shared.messages import MessageDecodeError, decode, message_id_of
from shared.topics import TopicKind, Topics
from slmops.mqtt.client import MqttClient
from slmops.mqtt.dedup import RecentIds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMessage:
    device_id: str
    kind: TopicKind
    message: BaseModel  # the model `shared.messages.model_for(kind)` names
    topic: str
    received_at: datetime


BatchHandler = Callable[[list[DeviceMessage]], None]


@dataclass
class IngestCounters:
    received: int = 0
    dispatched: int = 0
    duplicates: int = 0
    unknown_topics: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by MessageDecodeError.reason
    batches: int = 0
    handler_errors: int = 0

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


@dataclass(frozen=True)
class _Raw:
    topic: str
    payload: bytes
    received_at: datetime


_STOP = object()


class DeviceMessageSubscriber:
    """Subscribe with `client` to everything devices publish under `topics` and feed `handler`."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        handler: BatchHandler,
        *,
        max_batch: int = 500,
        max_delay_s: float = 0.01,
        dedup: RecentIds | None = None,
        kinds: tuple[TopicKind, ...] | None = None,
    ) -> None:
        self.client = client
        self.topics = topics
        self.counters = IngestCounters()
        self._handler = handler
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._dedup = dedup if dedup is not None else RecentIds(65536)
        self._kinds = kinds
        self._queue: queue.Queue[_Raw | object] = queue.Queue()
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker and register the subscriptions (restored by the client on reconnect)."""
        self._worker = threading.Thread(target=self._run, name="slmops-mqtt-ingest", daemon=True)
        self._worker.start()
        filters = (
            [self.topics.all_devices(k) for k in self._kinds]
            if self._kinds
            else self.topics.control_plane_subscriptions()
        )
        for topic_filter in filters:
            self.client.subscribe(topic_filter, self._enqueue, qos=1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued, then stop the worker."""
        if self._worker is None:
            return
        self._queue.put(_STOP)
        self._worker.join(timeout_s)
        self._worker = None

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.counters.received += 1
        self._queue.put(_Raw(topic, payload, datetime.now(UTC)))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect()
            if batch:
                self._dispatch(batch)

    def _collect(self) -> tuple[list[DeviceMessage], bool]:
        """Block for the first message, then take more until the batch is full or the delay is up."""
        batch: list[DeviceMessage] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._max_delay_s
        while True:
            if item is _STOP:
                return batch, True
            if isinstance(item, _Raw) and (decoded := self.decode_raw(item)) is not None:
                batch.append(decoded)
            remaining = deadline - time.monotonic()
            if len(batch) >= self._max_batch or remaining <= 0:
                return batch, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, False

    def decode_raw(self, raw: _Raw) -> DeviceMessage | None:
        """Decode one message; None (counted, logged) if it is unknown, malformed or a redelivery."""
        parsed = self.topics.parse(raw.topic)
        if parsed is None:
            self.counters.unknown_topics += 1
            log.warning("dropping a message on unknown topic %s", raw.topic)
            return None
        try:
            message = decode(parsed.kind, raw.payload)
        except MessageDecodeError as exc:
            self.counters.malformed[exc.reason] += 1
            log.warning("dropping a malformed %s message from device %s: %s", parsed.kind, parsed.device_id, exc)
            return None
        message_id = message_id_of(message)
        if message_id is not None and not self._dedup.first_time(f"{parsed.device_id}/{message_id}"):
            self.counters.duplicates += 1
            return None
        return DeviceMessage(parsed.device_id, parsed.kind, message, raw.topic, raw.received_at)

    def _dispatch(self, batch: list[DeviceMessage]) -> None:
        self.counters.batches += 1
        try:
            self._handler(batch)
        except Exception:
            # The consumer survives a failing handler; the batch is logged as lost.
            self.counters.handler_errors += 1
            log.exception("ingest batch handler failed on %d messages", len(batch))
            return
        self.counters.dispatched += len(batch)


def on_loop(
    loop: asyncio.AbstractEventLoop, handler: Callable[[list[DeviceMessage]], Coroutine[Any, Any, None]]
) -> BatchHandler:
    """Run an async batch handler on `loop`, waiting for it (backpressure on the worker thread)."""

    def run(batch: list[DeviceMessage]) -> None:
        asyncio.run_coroutine_threadsafe(handler(batch), loop).result()

    return run
