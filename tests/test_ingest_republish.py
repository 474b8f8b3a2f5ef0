"""A device that comes online without having acted on its desired state gets it published again.

A broker failing over can lose a retained desired state for a device reconnecting meanwhile (NATS
2.9 serves retained messages from a per-node copy; tests/test_nats_rollout.py met it): its birth
message makes the publisher send the state again, and only where the device has not acted on it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import DesiredStateRow, Device
from control_plane.rollouts import assign
from shared.messages import StatusMessage
from shared.topics import TopicKind
from tests.support.telemetry import add_devices, ingest


def _published(engine: sa.Engine, device_id: str, message_id: str, *, acked: str | None) -> None:
    with Session(engine) as session:
        session.add(
            DesiredStateRow(device_id=device_id, message_id=message_id, model="m", version="1",
                            artifact_sha256="0" * 64, payload={}, published_message_id=message_id)
        )  # fmt: skip
        device = session.get(Device, device_id)
        assert device is not None
        device.acked_message_id = acked
        session.add(device)
        session.commit()


def _birth(device_id: str) -> DeviceMessage:
    birth = StatusMessage(status="online")
    return DeviceMessage(device_id, TopicKind.STATUS, birth, "test/status", datetime.now(UTC))


def test_a_birth_republishes_only_a_desired_state_the_device_has_not_acted_on(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:8]
    waiting, done, silent = add_devices(engine, f"waiting-{tag}", f"done-{tag}", f"silent-{tag}")
    for device_id, acked in ((waiting, "older"), (done, f"m-{done}"[:36]), (silent, None)):
        _published(engine, device_id, f"m-{device_id}"[:36], acked=acked)

    ingest(engine, [_birth(waiting), _birth(done)])

    with Session(engine) as session:
        pending = {device_id for device_id, _, _ in assign.pending_publication(session)}
    assert pending == {waiting}  # acted on, or not reconnected: left as published
