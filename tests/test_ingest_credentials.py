"""Ingest stores messages only from devices holding a live credential: a device waiting for a
reissued token (or decommissioned) stays as it is, and its telemetry never reaches a gate."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, DeviceStatus
from shared.messages import EventMessage, StateMessage, StatusMessage
from shared.state import DeviceState
from shared.topics import TopicKind
from tests.support.telemetry import add_devices, ingest, window


def _everything_from(device_id: str) -> list[DeviceMessage]:
    now = datetime.now(UTC)
    state = StateMessage.wrap(DeviceState(device_id=device_id, phase="committed"))
    return [
        DeviceMessage(device_id, TopicKind.STATUS, StatusMessage(status="online"), "t/status", now),
        DeviceMessage(device_id, TopicKind.STATE, state, "t/state", now),
        DeviceMessage(device_id, TopicKind.EVENTS, EventMessage(kind="download_failed", message="x"), "t/events", now),
        window(device_id, now, {3: 2}),
    ]


def _stored(engine: sa.Engine, device_id: str) -> tuple[str, int, int]:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        count = "SELECT count(*) FROM {} WHERE device_id = :d"
        events = session.execute(sa.text(count.format("device_events")), {"d": device_id}).scalar_one()
        windows = session.execute(sa.text(count.format("telemetry_windows")), {"d": device_id}).scalar_one()
        return device.status, events, windows


def test_messages_from_devices_without_a_live_credential_are_dropped_and_counted(engine: sa.Engine) -> None:
    tag = uuid.uuid4().hex[:6]
    (live,) = add_devices(engine, f"live-{tag}", status=DeviceStatus.offline)
    (pending,) = add_devices(engine, f"pending-{tag}", status=DeviceStatus.pending_enrollment)
    (retired,) = add_devices(engine, f"retired-{tag}", status=DeviceStatus.decommissioned)
    writer = ingest(engine, [m for d in (live, pending, retired) for m in _everything_from(d)])
    assert _stored(engine, live) == (DeviceStatus.online, 1, 1)
    assert _stored(engine, pending) == (DeviceStatus.pending_enrollment, 0, 0)
    assert _stored(engine, retired) == (DeviceStatus.decommissioned, 0, 0)
    assert writer.counters["no_credential"] == 8
    assert writer.counters["unknown_device"] == 0
