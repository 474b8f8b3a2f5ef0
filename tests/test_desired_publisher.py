"""The desired-state Publisher (and FleetRuntime's handover to it) against the real Mosquitto: the
outbox goes out in batches, every state once and marked published in bounded lots; a state written
while a publish is under way, for a device it has passed, goes out on the next call."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.config import Settings
from control_plane.fleet.channel import FleetRuntime
from control_plane.fleet.publisher import Publisher, PublishTuning
from control_plane.rollouts import assign
from shared.desired import ArtifactRef, DesiredState
from tests.support.mqtt import SYSTEM_MOSQUITTO, ClientFactory, Collector, clients, unique_topics
from tests.support.telemetry import add_devices
from tests.support.waiting import wait_for

__all__ = ["clients"]  # fixture
pytestmark = [pytest.mark.mosquitto, pytest.mark.usefixtures("empty_tables")]


def _state(version: str) -> dict[str, Any]:
    artifact = ArtifactRef(sha256="ab" * 32, size_bytes=10, format="gguf", url="/v1/artifacts/x")
    return DesiredState(message_id="-", model="m", version=version, artifact=artifact).model_dump(mode="json")


def _write(engine: sa.Engine, states: dict[str, dict[str, Any]]) -> None:
    with Session(engine) as session:
        assign.write_desired(session, states)
        session.commit()


def _pending(engine: sa.Engine) -> list[str]:
    with Session(engine) as session:
        return [device_id for device_id, _, _ in assign.pending_publication(session)]


def _received_ids(received: Collector) -> list[str]:
    return [topic.split("/")[-2] for topic, _ in received.items]


class Hold:
    """Stands in for the ingest subscriber's hold: runs `on_enter` and `on_release` around it."""

    def __init__(self, on_enter: Callable[[], object] = lambda: None, on_release: Callable[[], object] = lambda: None):
        self.on_enter, self.on_release = on_enter, on_release
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entered += 1
        self.on_enter()
        try:
            yield
        finally:
            self.on_release()


def test_batches_go_out_in_id_order_and_a_state_written_meanwhile_goes_out_next(
    engine: sa.Engine, clients: ClientFactory
) -> None:
    topics = unique_topics()
    publisher = Publisher(engine, topics, PublishTuning(batch=3))  # 10 states: batches of 3, 3, 3 and 1
    client = clients(SYSTEM_MOSQUITTO)
    received = Collector()
    clients(SYSTEM_MOSQUITTO).subscribe(topics.all_devices("desired"), received)
    devices = add_devices(engine, *(f"pub-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)))
    first = {device_id: assign.with_message_id(_state("1")) for device_id in devices}
    _write(engine, first)

    # Once the first batch is read (ingest is held from then on), a new state is written for the
    # first device in id order, which the publish has passed already (as an abort could).
    early = sorted(devices)[0]
    newer = {early: assign.with_message_id(_state("2"))}
    assert publisher.publish_pending(client, Hold(on_enter=lambda: _write(engine, newer))) == 10
    wait_for(lambda: len(received.items) >= 10)
    assert _received_ids(received) == sorted(devices)  # each once, in id order
    got = {topic.split("/")[-2]: json.loads(payload) for topic, payload in received.items}
    assert {d: p["message_id"] for d, p in got.items()} == {d: s["message_id"] for d, s in first.items()}
    assert _pending(engine) == [early]  # its new state was written after the publish passed it

    assert publisher.publish_pending(client) == 1
    assert _pending(engine) == []
    wait_for(lambda: len(received.items) >= 11)
    topic, payload = received.items[-1]
    assert topic == topics.desired(early) and json.loads(payload)["version"] == "2"


def test_acknowledged_states_are_marked_in_bounded_lots_while_the_rest_go_out(
    engine: sa.Engine, clients: ClientFactory
) -> None:
    topics = unique_topics()
    publisher = Publisher(engine, topics, PublishTuning(batch=3, ahead=1, mark_every=6))
    devices = add_devices(engine, *(f"ahead-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)))
    _write(engine, {device_id: assign.with_message_id(_state("1")) for device_id in devices})
    pending_at_last: list[int] = []

    def on_desired(topic: str, payload: bytes) -> None:
        if topic == topics.desired(sorted(devices)[-1]):
            pending_at_last.append(len(_pending(engine)))

    clients(SYSTEM_MOSQUITTO).subscribe(topics.all_devices("desired"), on_desired)
    assert publisher.publish_pending(clients(SYSTEM_MOSQUITTO)) == 10
    wait_for(lambda: len(pending_at_last) == 1)
    # The first six were acknowledged and marked before the last batch went out.
    assert pending_at_last[0] <= 4
    assert _pending(engine) == []


def test_ingest_is_held_over_every_batch_and_released_before_marking(engine: sa.Engine, clients: ClientFactory) -> None:
    topics = unique_topics()
    publisher = Publisher(engine, topics, PublishTuning(batch=3))  # 7 states: three batches
    devices = add_devices(engine, *(f"hold-{i}-{uuid.uuid4().hex[:6]}" for i in range(7)))
    _write(engine, {device_id: assign.with_message_id(_state("1")) for device_id in devices})
    pending_at_release: list[int] = []
    hold = Hold(on_release=lambda: pending_at_release.append(len(_pending(engine))))
    assert publisher.publish_pending(clients(SYSTEM_MOSQUITTO), hold) == 7
    # Held once for all three batches; the acknowledgements are stored before the mark.
    assert hold.entered == 1 and pending_at_release == [7]
    assert _pending(engine) == []


@pytest.fixture
def leading(engine: sa.Engine, settings: Settings, clients: ClientFactory) -> Iterator[FleetRuntime]:
    """A runtime holding the controller lock (as the replica that publishes), on the real Mosquitto."""
    runtime = FleetRuntime(
        settings.model_copy(update={"mqtt_topic_prefix": f"slmops-test-{uuid.uuid4().hex[:10]}/v1"}),
        engine,
        PublishTuning(batch=3),
    )
    runtime.publisher = clients(SYSTEM_MOSQUITTO)
    assert runtime.leader.try_acquire()
    yield runtime
    runtime.leader.release()


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Device ids read back from the outbox from now on, in order."""
    read: list[str] = []
    real_read = assign.pending_publication

    def recording(session: Session, limit: int = 5000, **kwargs: Any) -> list[tuple[str, str, str]]:
        rows = real_read(session, limit, **kwargs)
        read.extend(device_id for device_id, _, _ in rows)
        return rows

    monkeypatch.setattr(assign, "pending_publication", recording)
    return read


def _desired_received(leading: FleetRuntime, clients: ClientFactory) -> Collector:
    """Every desired state the broker delivers, as a subscriber on the system Mosquitto sees them."""
    received = Collector()
    clients(SYSTEM_MOSQUITTO).subscribe(leading.topics.all_devices("desired"), received)
    return received


def _commit_handed_over(engine: sa.Engine, leading: FleetRuntime, states: dict[str, Any]) -> None:
    """Write `states` and commit while they are handed over to the publisher, as rollouts do."""
    with Session(engine) as session, leading.handing_over(states):
        assign.write_desired(session, states)
        session.commit()


def test_states_handed_over_at_commit_go_out_first_and_are_never_read_back(
    engine: sa.Engine, leading: FleetRuntime, clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 7 handed over: three batches from memory
    received = _desired_received(leading, clients)
    handed_ids = add_devices(engine, *(f"hand-{i}-{uuid.uuid4().hex[:6]}" for i in range(7)))
    other = add_devices(engine, f"other-{uuid.uuid4().hex[:6]}")[0]
    _write(engine, {other: assign.with_message_id(_state("1"))})  # in the outbox only
    handed = {device_id: assign.with_message_id(_state("2")) for device_id in handed_ids}
    _commit_handed_over(engine, leading, handed)
    read = _reads(monkeypatch)

    assert leading.publish_pending() == 8
    assert read == [other]  # the handed-over states were not read back
    wait_for(lambda: len(received.items) >= 8)
    order = [topic.split("/")[-2] for topic, _ in received.items]
    assert set(order[:7]) == set(handed_ids) and order[7] == other
    got = {topic.split("/")[-2]: json.loads(payload) for topic, payload in received.items}
    assert {d: got[d] for d in handed_ids} == handed  # as committed, byte for byte in content
    assert _pending(engine) == []  # all marked published


def test_a_state_written_after_a_handed_over_one_goes_out_after_it(
    engine: sa.Engine, leading: FleetRuntime, clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rollout's first stage is handed over; before the publisher runs, an abort (another
    # request, perhaps on another replica) replaces one device's state without handing it over.
    received = _desired_received(leading, clients)
    devices = add_devices(engine, *(f"race-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)))
    stage = {device_id: assign.with_message_id(_state("2")) for device_id in devices}
    _commit_handed_over(engine, leading, stage)
    restored = {devices[0]: assign.with_message_id(_state("1"))}
    _write(engine, restored)
    read = _reads(monkeypatch)

    assert leading.publish_pending() == 4
    assert read == [devices[0]]  # the replacement is read back; the handed-over states are not
    wait_for(lambda: len(received.items) >= 4)
    for_first = [json.loads(p)["message_id"] for t, p in received.items if t == leading.topics.desired(devices[0])]
    # The newer state last: the broker retains it and the device acts on it.
    assert for_first == [stage[devices[0]]["message_id"], restored[devices[0]]["message_id"]]
    assert _pending(engine) == []


def test_a_replica_that_does_not_publish_takes_nothing_over(
    engine: sa.Engine, settings: Settings, clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = FleetRuntime(
        settings.model_copy(update={"mqtt_topic_prefix": f"slmops-test-{uuid.uuid4().hex[:10]}/v1"}), engine
    )
    runtime.publisher = clients(SYSTEM_MOSQUITTO)
    devices = add_devices(engine, *(f"follow-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)))
    states = {device_id: assign.with_message_id(_state("1")) for device_id in devices}
    with Session(engine) as session, runtime.handing_over(states):  # not the leader
        assign.write_desired(session, states)
        session.commit()
    read = _reads(monkeypatch)
    # Should it become the leader, its publisher reads them from the outbox like any other state.
    assert runtime.publish_pending() == 2
    assert sorted(read) == sorted(devices)
    assert _pending(engine) == []
