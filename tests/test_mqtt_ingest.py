"""The control plane's batched, typed ingest, and telemetry that outlives a broker outage."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane.fleet.batch_writer import ISOLATE_CALLS
from control_plane.fleet.subscriber import DeviceMessage, DeviceMessageSubscriber
from edge_agent.mqtt.outbox import SpooledPublisher
from edge_agent.mqtt.spool import MessageSpool
from shared.messages import EventMessage, StateMessage, StatusMessage, TelemetryMessage, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import (
    SYSTEM_MOSQUITTO,
    WAIT_S,
    ClientFactory,
    broker_url,
    clients,
    embedded_broker,
    private_mosquitto,
    unique_topics,
)
from tests.support.waiting import wait_for

__all__ = ["broker_url", "clients", "embedded_broker", "private_mosquitto"]  # fixtures


class Batches:
    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[DeviceMessage]] = []
        self._fail_first = fail_first
        self._lock = threading.Lock()

    def __call__(self, batch: list[DeviceMessage]) -> None:
        with self._lock:
            if self._fail_first:
                self._fail_first = False
                raise RuntimeError("database down")
            self.batches.append(batch)

    @property
    def messages(self) -> list[DeviceMessage]:
        with self._lock:
            return [m for b in self.batches for m in b]


def window(seq: int) -> TelemetryMessage:
    now = datetime.now(UTC)
    return TelemetryMessage.wrap(TelemetryWindow(seq=seq, window_start=now, window_end=now, requests=seq))


def test_typed_batches_with_malformed_and_duplicates_dropped(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    batches = Batches()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, batches, max_batch=100, max_delay_s=0.5)
    ingest.start()
    try:
        device = clients(broker_url)
        state = encode(StateMessage.wrap(DeviceState(phase="downloading")))
        device.publish(topics.state("dev-1"), state)
        device.publish(topics.state("dev-1"), state)  # a QoS 1 redelivery: same message id
        device.publish(topics.telemetry("dev-1"), b"{this is not json")
        device.publish(topics.events("dev-1"), json.dumps({"kind": "meteor_strike"}).encode())
        device.publish(topics.status("dev-1"), json.dumps({"schema_version": 7, "status": "online"}).encode())
        device.publish(topics.telemetry("dev-2"), encode(window(1)))
        device.publish(topics.events("dev-2"), encode(EventMessage(kind="download_failed", message="404")))
        wait_for(lambda: len(batches.messages) >= 3 and ingest.counters.received >= 7)
    finally:
        ingest.stop()
    got = [(m.device_id, m.kind) for m in batches.messages]
    assert got == [("dev-1", TopicKind.STATE), ("dev-2", TopicKind.TELEMETRY), ("dev-2", TopicKind.EVENTS)]
    assert isinstance(batches.messages[1].message, TelemetryMessage)
    assert ingest.counters.duplicates == 1
    assert dict(ingest.counters.malformed) == {"malformed_json": 1, "invalid": 1, "unknown_schema_version": 1}
    assert ingest.counters.dispatched == 3


def test_a_batch_the_handler_fails_once_is_stored_on_the_retry(embedded_broker: object, clients: ClientFactory) -> None:
    url = embedded_broker.url  # type: ignore[attr-defined]
    topics = unique_topics()
    batches = Batches(fail_first=True)  # a database blip
    ingest = DeviceMessageSubscriber(
        clients(url), topics, batches, max_batch=1, max_delay_s=0.01, retry_delays_s=(0.05,)
    )
    ingest.start()
    try:
        device = clients(url)
        device.publish(topics.status("dev-1"), encode(StatusMessage(status="online")))
        device.publish(topics.status("dev-1"), encode(StatusMessage(status="offline")))
        wait_for(lambda: len(batches.messages) == 2)
    finally:
        ingest.stop()
    assert [m.message.status for m in batches.messages] == ["online", "offline"]  # type: ignore[attr-defined]
    assert ingest.counters.handler_errors == 1 and ingest.counters.lost == 0


class Refusing:
    """A handler that refuses every batch holding one of `bad` (by telemetry seq), or everything."""

    def __init__(self, bad: set[int] | None) -> None:
        self.bad = bad
        self.stored: list[int] = []
        self.calls = 0

    def __call__(self, batch: list[DeviceMessage]) -> None:
        self.calls += 1
        seqs = [m.message.seq for m in batch]  # type: ignore[attr-defined]
        if self.bad is None or self.bad & set(seqs):
            raise RuntimeError("value out of range")
        self.stored += seqs


def _ingest_windows(handler: Refusing, clients: ClientFactory, count: int) -> DeviceMessageSubscriber:
    """`count` telemetry windows from one device, written as one batch (a hold ends in one write)."""
    topics = unique_topics()
    ingest = DeviceMessageSubscriber(
        clients(SYSTEM_MOSQUITTO), topics, handler, max_batch=count, max_write=count, retry_delays_s=(0.01,)
    )
    ingest.start()
    try:
        with ingest.held():
            clients(SYSTEM_MOSQUITTO).publish_many(
                [Outgoing(topics.telemetry("dev-1"), encode(window(seq))) for seq in range(count)], timeout_s=30
            )
            wait_for(lambda: ingest.counters.held >= count)
    finally:
        ingest.stop()
    return ingest


@pytest.mark.mosquitto
def test_a_message_the_handler_refuses_costs_only_itself_not_its_batch(clients: ClientFactory) -> None:
    handler = Refusing(bad={37, 300})
    ingest = _ingest_windows(handler, clients, 400)
    assert sorted(handler.stored) == [seq for seq in range(400) if seq not in (37, 300)]
    assert ingest.counters.lost == 2 and ingest.counters.dispatched == 398


@pytest.mark.mosquitto
def test_a_handler_that_refuses_everything_loses_a_counted_batch_in_bounded_calls(clients: ClientFactory) -> None:
    handler = Refusing(bad=None)  # the database stays down
    ingest = _ingest_windows(handler, clients, 400)
    assert handler.stored == [] and ingest.counters.lost == 400
    assert handler.calls <= 2 + ISOLATE_CALLS  # the first try, one retry, then halves


def test_batches_respect_max_batch(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    batches = Batches()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, batches, max_batch=10, max_write=10, max_delay_s=2.0)
    ingest.start()
    try:
        clients(broker_url).publish_many(
            [Outgoing(topics.telemetry(f"dev-{i % 5}"), encode(window(i))) for i in range(35)]
        )
        wait_for(lambda: len(batches.messages) == 35)
    finally:
        ingest.stop()
    assert all(len(b) <= 10 for b in batches.batches) and len(batches.batches) >= 4


class SlowFirst(Batches):
    """A handler whose first call waits until released, as a slow database transaction would."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, batch: list[DeviceMessage]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(WAIT_S)
        super().__call__(batch)


def test_batches_queued_behind_a_slow_write_go_to_the_next_call_together_in_order(
    broker_url: str, clients: ClientFactory
) -> None:
    topics = unique_topics()
    handler = SlowFirst()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, handler, max_batch=5, max_write=20, max_delay_s=0.01)
    ingest.start()
    try:
        device = clients(broker_url)
        device.publish(topics.telemetry("dev-1"), encode(window(0)))  # the first call takes this one
        assert handler.entered.wait(WAIT_S)
        device.publish_many([Outgoing(topics.telemetry("dev-1"), encode(window(i))) for i in range(1, 31)])
        wait_for(lambda: ingest.counters.received == 31)
        time.sleep(0.1)  # past max_delay_s: the last partial batch is queued too
        handler.release.set()
        wait_for(lambda: len(handler.messages) == 31)
    finally:
        ingest.stop()
    sizes = [len(b) for b in handler.batches]
    # Queued at most 5 at a time while the first call waited (fewer when a batch is cut by time), they
    # reach the handler merged: a call takes batches until it holds 20, so at most 20 + 5 - 1.
    assert sizes[0] == 1 and max(sizes[1:]) >= 20 and all(size <= 24 for size in sizes), sizes
    assert [m.message.seq for m in handler.messages] == list(range(31))  # type: ignore[attr-defined]


def test_held_ingest_stores_nothing_until_released_then_everything_in_order(
    broker_url: str, clients: ClientFactory
) -> None:
    topics = unique_topics()
    batches = Batches()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, batches, max_batch=100, max_delay_s=0.01)
    ingest.start()
    device = clients(broker_url)
    try:
        with ingest.held():
            device.publish_many([Outgoing(topics.telemetry("dev-1"), encode(window(i))) for i in range(30)])
            # Read and acknowledged to the broker, not decoded or stored yet.
            wait_for(lambda: ingest.counters.held == 30)
            time.sleep(0.2)
            assert batches.messages == [] and ingest.counters.received == 0
        # Released: stored in arrival order, before and with what arrives after the hold.
        device.publish_many([Outgoing(topics.telemetry("dev-1"), encode(window(i))) for i in range(30, 40)])
        wait_for(lambda: len(batches.messages) == 40)
    finally:
        ingest.stop()
    assert [m.message.seq for m in batches.messages] == list(range(40))  # type: ignore[attr-defined]


def test_what_a_hold_put_aside_is_handed_over_in_batches_of_max_write(broker_url: str, clients: ClientFactory) -> None:
    # A stage's acknowledgements come back during its publish: on release they reach the handler
    # in as few calls as `max_write` allows, not one per `max_batch`.
    topics = unique_topics()
    batches = Batches()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, batches, max_batch=10, max_write=25, max_delay_s=0.01)
    ingest.start()
    try:
        with ingest.held():
            clients(broker_url).publish_many(
                [Outgoing(topics.telemetry("dev-1"), encode(window(i))) for i in range(30)]
            )
            wait_for(lambda: ingest.counters.held == 30)
        wait_for(lambda: len(batches.messages) == 30)
    finally:
        ingest.stop()
    assert [len(batch) for batch in batches.batches] == [25, 5]
    assert [m.message.seq for m in batches.messages] == list(range(30))  # type: ignore[attr-defined]


def test_a_full_hold_ends_early_and_keeps_the_order(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    batches = Batches()
    ingest = DeviceMessageSubscriber(clients(broker_url), topics, batches, max_batch=100, max_delay_s=0.01, max_held=5)
    ingest.start()
    try:
        with ingest.held():
            messages = [Outgoing(topics.telemetry("dev-1"), encode(window(i))) for i in range(12)]
            clients(broker_url).publish_many(messages)
            wait_for(lambda: len(batches.messages) == 12)  # stored although still inside the block
    finally:
        ingest.stop()
    assert [m.message.seq for m in batches.messages] == list(range(12))  # type: ignore[attr-defined]


def test_telemetry_produced_during_an_outage_arrives_after_it(
    private_mosquitto: MosquittoProcess, clients: ClientFactory, tmp_path: Path
) -> None:
    private_mosquitto.start({"dev-1": "s1"})
    topics = private_mosquitto.topics
    batches = Batches()
    ingest = DeviceMessageSubscriber(
        clients(
            private_mosquitto.admin_url,
            client_id="cp-ingest",
            persistent_session=True,
            reconnect_min_delay_s=1,
            reconnect_max_delay_s=2,
        ),
        topics,
        batches,
        max_delay_s=0.05,
    )
    ingest.start()
    device: MqttClient = clients(
        private_mosquitto.url("dev-1", "s1"),
        client_id="dev-1",
        reconnect_min_delay_s=1,
        reconnect_max_delay_s=2,
    )
    outbox = SpooledPublisher(device, MessageSpool(tmp_path / "spool.db", max_messages=8))
    outbox.start()
    try:
        assert outbox.publish(topics.telemetry("dev-1"), encode(window(0))) is True
        private_mosquitto.stop()
        wait_for(lambda: not device.connected)
        # 10 windows into a spool of 8: the two oldest are dropped and counted.
        assert [outbox.publish(topics.telemetry("dev-1"), encode(window(i))) for i in range(1, 11)] == [False] * 10
        dropped = outbox.spool.take_dropped()
        private_mosquitto.start()
        wait_for(lambda: len(batches.messages) == 9)
        assert outbox.publish(
            topics.telemetry("dev-1"), encode(TelemetryMessage.wrap(window(11), dropped_windows=dropped))
        )
        wait_for(lambda: len(batches.messages) == 10)
    finally:
        outbox.stop()
        ingest.stop()
    seqs = [m.message.seq for m in batches.messages]  # type: ignore[attr-defined]
    assert seqs == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert batches.messages[-1].message.dropped_windows == 2  # type: ignore[attr-defined]
    assert len(outbox.spool) == 0
