"""The writer thread: decoded batches from any source (`submit`) go to the handler, one call at a
time in arrival order, so the handler can write one SQL transaction per call (ADR 0008).

A call takes the batches queued behind the one it picks up, up to `max_write` messages: under load
a transaction grows to what arrived during the last one. At most `pending_batches` batches wait;
beyond that `submit` blocks, which is the backpressure on the source. A batch the handler fails
is tried again after each of `retry_delays_s`, then in halves, so a message it cannot store costs
only itself. `on_settled` hears of each batch once it is stored or given up (counted lost).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from control_plane.fleet.decode import DeviceMessage, IngestCounters
from shared.mqtt.errors import UnstorableBatch

log = logging.getLogger("control_plane.fleet.subscriber")
PENDING_BATCHES = 8  # batches waiting for the writer; bounds memory, keeps backpressure
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # pauses before a failed batch is handed over again
ISOLATE_CALLS = 64  # handler calls spent halving a batch that keeps failing (finds a few bad messages in 2,000)

BatchHandler = Callable[[list[DeviceMessage]], None]


class BatchWriter:
    def __init__(
        self,
        handler: BatchHandler,
        counters: IngestCounters | None = None,
        *,
        max_write: int = 2000,
        pending_batches: int = PENDING_BATCHES,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        isolate_calls: int = ISOLATE_CALLS,
        on_settled: Callable[[list[DeviceMessage]], None] | None = None,
    ) -> None:
        self.counters = counters if counters is not None else IngestCounters()
        self._handler = handler
        self._max_write = max_write
        self._retry_delays_s = tuple(retry_delays_s)
        self._isolate_calls = isolate_calls
        self._on_settled = on_settled
        self._pending: queue.Queue[list[DeviceMessage] | None] = queue.Queue(maxsize=pending_batches)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_batches, name="slmops-mqtt-ingest-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: list[DeviceMessage]) -> None:
        """Queue a batch for the handler; waits while `pending_batches` are queued (backpressure)."""
        self._pending.put(batch)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store every batch submitted so far, then stop the thread."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def _write_batches(self) -> None:
        """Hand each batch to the handler with the batches queued behind it, until the call holds
        `max_write` messages (so at most `max_write` plus one batch less one), in arrival order."""
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

    def _dispatch(self, batch: list[DeviceMessage]) -> None:
        """Hand `batch` to the handler, retrying after each of the delays, then in halves
        (`_isolate`); one that raises `UnstorableBatch` goes to halves at once. The messages are
        acknowledged to the broker already: what the handler never takes is counted (`lost`, or
        `unstorable` for a message refused alone as such) and logged with the device ids."""
        self.counters.batches += 1
        for delay_s in (*self._retry_delays_s, None):
            try:
                self._handler(batch)
            except UnstorableBatch as exc:
                self.counters.handler_errors += 1
                self._isolate(batch, budget=[self._isolate_calls], error=exc)
                break
            except Exception as exc:
                self.counters.handler_errors += 1
                log.exception("ingest batch handler failed on %d messages", len(batch))
                if delay_s is None:
                    self._isolate(batch, budget=[self._isolate_calls], error=exc)
                else:
                    time.sleep(delay_s)  # the writer's thread: the source reads on, backpressure bounds it
                continue
            self.counters.dispatched += len(batch)
            break
        if self._on_settled is not None and batch:
            self._on_settled(batch)

    def _isolate(self, batch: list[DeviceMessage], budget: list[int], error: Exception) -> None:
        """Store what the handler takes of a batch it keeps refusing, half by half. Halves refused
        with `UnstorableBatch` are split further at no cost (each split makes progress, so at most
        2n calls); other refusals spend `budget` (a database that stays down refuses every half)."""
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
