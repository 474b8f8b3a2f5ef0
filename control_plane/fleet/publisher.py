"""Desired states out to the broker (retained, QoS 1): what requests handed over at commit, then
the outbox, in batches queued ahead of the broker's acknowledgements, marked published once
acknowledged (ADR 0009 for the handover)."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.rollouts import assign
from shared.mqtt.client import MqttClient, Outgoing
from shared.topics import Topics

Handed = tuple[str, str, bytes]  # a committed desired state: device id, message id, payload
Queued = tuple[list[tuple[str, str]], list[tuple[str, paho.MQTTMessageInfo]]]  # (device, message id)s, infos
Hold = Callable[[], AbstractContextManager[Any]]  # pauses ingest while the batches go out


@dataclass(frozen=True)
class PublishTuning:
    batch: int = 2000  # desired states read and queued at a time
    ahead: int = 4  # batches queued beyond the one whose PUBACKs are awaited (bounds what paho holds)
    mark_every: int = 20_000  # acknowledged states marked published at least this often


class Publisher:
    """Sends the desired-state outbox; `leading()` says whether this replica is the one that publishes."""

    def __init__(
        self,
        engine: sa.Engine,
        topics: Topics,
        tuning: PublishTuning | None = None,
        *,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.engine = engine
        self.topics = topics
        self.tuning = tuning or PublishTuning()
        self._leading = leading
        self._handoff = threading.Lock()
        self._handed: list[Handed] = []  # committed desired states handed over by requests

    @contextlib.contextmanager
    def handing_over(self, states: dict[str, dict[str, Any]]) -> Iterator[None]:
        """Around the commit of desired states an API request wrote (device id -> DesiredState as
        JSON): once committed, they go out as they are instead of being read back from the
        database (ADR 0009). They stay in the outbox, unmarked, until the broker acknowledges them, so a crash
        before that loses nothing: the next leader reads them back.

        The lock makes each such commit and its handover one step for the publisher, which takes
        what was handed over under the same lock just before every read of the outbox: a read can
        see a newer state for a device (an abort, from any replica, commits after the rollout it
        aborts) only once the older, handed-over one is queued before it on the one connection."""
        with self._handoff:
            yield
            if states and self._leading():  # only the leader publishes; others leave it to the outbox
                self._handed.extend(
                    (device_id, payload["message_id"], orjson.dumps(payload)) for device_id, payload in states.items()
                )

    def publish_pending(self, client: MqttClient | None, hold: Hold | None = None) -> int:
        """Send every desired state not yet acknowledged by the broker, on `client`, and return how
        many went out: a 10,000-device stage goes out now, not one batch per controller tick.

        Handed-over states go first, then the rest of the outbox in device-id order. Up to
        `tuning.ahead` batches wait for PUBACKs while the next is read, so the broker never waits
        for the database. Acknowledged states are marked published at the end (and every
        `tuning.mark_every`): a crash before that sends them again, which devices ignore (message
        ids). A state written meanwhile for a device already passed goes out on the next call.
        `hold` is entered before the first batch and left once all are acknowledged."""
        if client is None:
            self.forget_handed()
            return 0
        return _Run(self, client, hold).publish()

    def forget_handed(self) -> None:
        """Not connected: the outbox has what was handed over, read back once connected."""
        with self._handoff:
            self._handed.clear()

    def next_batch(
        self, handed: collections.deque[list[Handed]], taken: list[str], after: str | None
    ) -> tuple[list[Handed], bool, str | None]:
        """The next batch to queue, whether it ends the outbox, and the device id read up to: what
        requests handed over (taken into `handed`, their message ids into `taken`), then the
        outbox read back without them. Taken and read under the handover lock."""
        size = self.tuning.batch
        with self._handoff:
            if self._handed:
                fresh, self._handed = self._handed, []
                taken += [message_id for _, message_id, _ in fresh]
                handed.extend(fresh[i : i + size] for i in range(0, len(fresh), size))
            if handed:
                return handed.popleft(), False, after
            with Session(self.engine) as session:
                rows = assign.pending_publication(session, limit=size, after=after, excluding=taken)
        batch = [(device_id, message_id, payload.encode()) for device_id, message_id, payload in rows]
        return batch, len(rows) < size, rows[-1][0] if rows else after

    def mark(self, published: list[tuple[str, str]]) -> None:
        with Session(self.engine) as session:
            assign.mark_published(session, published)
            session.commit()


class _Run:
    """One publish_pending call: batches queued, awaited and marked."""

    def __init__(self, publisher: Publisher, client: MqttClient, hold: Hold | None) -> None:
        self.publisher, self.client, self.hold = publisher, client, hold
        self.handed: collections.deque[list[Handed]] = collections.deque()  # taken over, not queued yet
        self.taken: list[str] = []  # message ids taken over by this call: not read back
        self.waiting: collections.deque[Queued] = collections.deque()  # PUBACKs not waited on yet
        self.acked: list[tuple[str, str]] = []  # acknowledged by the broker, not marked yet
        self.sent = 0

    def publish(self) -> int:
        after: str | None = None
        with contextlib.ExitStack() as held:
            while self.client.connected:
                batch, last, after = self.publisher.next_batch(self.handed, self.taken, after)
                if batch:
                    if self.sent == 0 and self.hold is not None:
                        held.enter_context(self.hold())  # ingest waits until every batch is out
                    self._queue(batch)
                self._await(last)
                if len(self.acked) >= self.publisher.tuning.mark_every or (last and self.acked):
                    if last:
                        held.close()  # all out: the devices' acknowledgements are stored before the bookkeeping
                    self.publisher.mark(self.acked)
                    self.acked = []
                if last:
                    break
            else:
                self.publisher.forget_handed()
        return self.sent

    def _queue(self, batch: list[Handed]) -> None:
        topics = self.publisher.topics
        queued = self.client.publish_all(
            Outgoing(topics.desired(device_id), payload, qos=1, retain=True) for device_id, _, payload in batch
        )
        self.waiting.append(([(device_id, message_id) for device_id, message_id, _ in batch], queued))
        self.sent += len(batch)

    def _await(self, last: bool) -> None:
        """Wait for the PUBACKs of the batches beyond `tuning.ahead` (all of them after the last)."""
        while self.waiting and (last or len(self.waiting) > self.publisher.tuning.ahead):
            published, queued = self.waiting.popleft()
            self.client.wait_published(queued, timeout_s=60)
            self.acked.extend(published)
