"""Decoded messages gathered into batches: one goes to the sink once `max_batch` have gathered, or
`max_delay_s` after its first message (a flusher thread watches the clock).

The sink (`BatchWriter.submit`) may block: that is the backpressure that stops the thread adding
messages. Batches reach the sink one at a time, in arrival order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from control_plane.fleet.decode import DeviceMessage

Sink = Callable[[list[DeviceMessage]], None]


class Batcher:
    def __init__(self, sink: Sink, *, max_batch: int = 500, max_delay_s: float = 0.01) -> None:
        self._sink = sink
        self.max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._batch: list[DeviceMessage] = []
        self._batch_started = 0.0
        self._batch_lock = threading.Lock()  # guards _batch; held only to append or swap
        self._sink_lock = threading.Lock()  # one batch handed over at a time, in arrival order
        self._stop = threading.Event()
        self._gathering = threading.Event()  # set while a batch has messages (wakes the flusher)
        self._flusher: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_when_due, name="slmops-mqtt-ingest", daemon=True)
        self._flusher.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the flusher and hand over what has gathered."""
        if self._flusher is not None:
            self._stop.set()
            self._gathering.set()
            self._flusher.join(timeout_s)
            self._flusher = None
        self.flush()

    def add(self, message: DeviceMessage) -> None:
        with self._batch_lock:
            if not self._batch:
                self._batch_started = time.monotonic()
                self._gathering.set()
            self._batch.append(message)
            full = len(self._batch) >= self.max_batch
        if full:
            self.flush()

    def flush(self) -> None:
        """Hand over what has gathered."""
        self.flush_then(())

    def flush_then(self, batches: Iterable[list[DeviceMessage]]) -> None:
        """Hand over what has gathered, then `batches`, with no other batch in between."""
        with self._sink_lock:
            with self._batch_lock:
                gathered, self._batch = self._batch, []
            for batch in (gathered, *batches):
                if batch:
                    self._sink(batch)

    def _flush_when_due(self) -> None:
        """Sleeps while nothing gathers; hands over a batch that waited `max_delay_s` for company."""
        while self._gathering.wait() and not self._stop.is_set():
            with self._batch_lock:
                if not self._batch:
                    self._gathering.clear()  # under the lock: `add` sets it again with the next message
                    continue
                wait_s = self._batch_started + self._max_delay_s - time.monotonic()
            if wait_s > 0:
                self._stop.wait(wait_s)
            else:
                self.flush()
