"""FleetRuntime.publish_pending against the real Mosquitto: the desired-state outbox goes out in
pipelined batches, every state once and marked published; a state written while a publish is
under way, for a device it has passed, goes out on the next call."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane import fleet
from control_plane.config import Settings
from control_plane.fleet import FleetRuntime
from control_plane.rollouts import assign
from shared.desired import ArtifactRef, DesiredState
from tests.mqtt_support import SYSTEM_MOSQUITTO, ClientFactory, Collector, clients, wait_until
from tests.telemetry_support import add_devices

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


def test_batches_are_pipelined_and_a_state_written_meanwhile_goes_out_next(
    engine: sa.Engine, settings: Settings, clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet, "PUBLISH_BATCH", 3)  # 10 states: batches of 3, 3, 3 and 1
    prefix = f"slmops-test-{uuid.uuid4().hex[:10]}/v1"
    runtime = FleetRuntime(settings.model_copy(update={"mqtt_topic_prefix": prefix}), engine)
    runtime.publisher = clients(SYSTEM_MOSQUITTO)
    received = Collector()
    clients(SYSTEM_MOSQUITTO).subscribe(runtime.topics.all_devices("desired"), received)
    devices = add_devices(engine, *(f"pub-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)))
    first = {device_id: assign.with_message_id(_state("1")) for device_id in devices}
    _write(engine, first)

    # While the second batch is marked, a new state is written for the first device in id order,
    # which the publish has passed already (as an abort could, from an API request).
    early = sorted(devices)[0]
    marks: list[list[tuple[str, str]]] = []
    real_mark = assign.mark_published

    def mark(session: Session, published: list[tuple[str, str]]) -> None:
        marks.append(published)
        if len(marks) == 2:
            _write(engine, {early: assign.with_message_id(_state("2"))})
        real_mark(session, published)

    monkeypatch.setattr(assign, "mark_published", mark)
    assert runtime.publish_pending() == 10
    assert [len(batch) for batch in marks] == [3, 3, 3, 1]
    assert [d for batch in marks for d, _ in batch] == sorted(devices)  # each once, in id order
    assert wait_until(lambda: len(received.items) >= 10)
    got = {topic.split("/")[-2]: json.loads(payload) for topic, payload in received.items}
    assert {d: p["message_id"] for d, p in got.items()} == {d: s["message_id"] for d, s in first.items()}
    assert _pending(engine) == [early]  # its new state was written after the publish passed it

    assert runtime.publish_pending() == 1
    assert _pending(engine) == []
    assert wait_until(lambda: len(received.items) >= 11)
    topic, payload = received.items[-1]
    assert topic == runtime.topics.desired(early) and json.loads(payload)["version"] == "2"


class Hold:
    """Stands in for the ingest subscriber: records when publish_pending holds and releases it."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.events.append("hold")
        try:
            yield
        finally:
            self.events.append("release")


def test_ingest_is_held_over_every_batch_and_released_before_the_last_one_is_marked(
    engine: sa.Engine, settings: Settings, clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet, "PUBLISH_BATCH", 3)
    runtime = FleetRuntime(
        settings.model_copy(update={"mqtt_topic_prefix": f"slmops-test-{uuid.uuid4().hex[:10]}/v1"}), engine
    )
    runtime.publisher = clients(SYSTEM_MOSQUITTO)
    events: list[str] = []
    runtime.subscriber = Hold(events)  # type: ignore[assignment]
    devices = add_devices(engine, *(f"hold-{i}-{uuid.uuid4().hex[:6]}" for i in range(7)))
    _write(engine, {device_id: assign.with_message_id(_state("1")) for device_id in devices})
    real_mark = assign.mark_published

    def mark(session: Session, published: list[tuple[str, str]]) -> None:
        events.append(f"mark {len(published)}")
        real_mark(session, published)

    monkeypatch.setattr(assign, "mark_published", mark)
    assert runtime.publish_pending() == 7
    # Held once for all three batches; the acknowledgements are stored before the last mark.
    assert events == ["hold", "mark 3", "mark 3", "release", "mark 1"]
    assert _pending(engine) == []
