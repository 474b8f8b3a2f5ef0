"""Device messages decoded from the wire: topic parsed, payload validated, QoS 1 redeliveries
dropped by message id. What is dropped is counted (by reason) and logged with the device id."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel

from shared.messages import MessageDecodeError, decode, message_id_of
from shared.mqtt.dedup import RecentIds
from shared.topics import TopicKind, Topics

log = logging.getLogger("control_plane.fleet.subscriber")


@dataclass(frozen=True)
class DeviceMessage:
    device_id: str
    kind: TopicKind
    message: BaseModel  # the model `shared.messages.model_for(kind)` names
    topic: str
    received_at: datetime
    seq: int = 0  # its number in the ingest journal (0 without one)


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
    held: int = 0  # messages a hold (`DeviceMessageSubscriber.held`) put aside undecoded
    superseded: int = 0  # redelivered states/statuses a newer one of the device replaced (JetStream)
    handed_back: int = 0  # messages handed back for redelivery while the database refused them (JetStream)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class MessageDecoder:
    """Decodes one message at a time (from any source: MQTT, the journal's replay)."""

    def __init__(self, topics: Topics, counters: IngestCounters, dedup: RecentIds | None = None) -> None:
        self.topics = topics
        self.counters = counters
        self._dedup = dedup if dedup is not None else RecentIds(65536)

    def __call__(self, topic: str, payload: bytes, received_at: datetime, seq: int = 0) -> DeviceMessage | None:
        """The message, counted as received; None (counted, logged) if it is unknown, malformed or a redelivery."""
        self.counters.received += 1
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
        if message_id is not None and not self._dedup.first_time(dedup_key(parsed.device_id, message_id)):
            self.counters.duplicates += 1
            return None
        return DeviceMessage(parsed.device_id, parsed.kind, message, topic, received_at, seq)


def dedup_key(device_id: str, message_id: str) -> str:
    """What `RecentIds` remembers of a message: its id is unique per device only."""
    return f"{device_id}/{message_id}"
