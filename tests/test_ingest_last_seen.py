"""Ingest moves a device's last_seen only when it changes by LAST_SEEN_RESOLUTION or more (telemetry
alone), while state reports always write, so a telemetry window does not rewrite its device row."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.ingest import LAST_SEEN_RESOLUTION
from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, as_utc
from shared.messages import StateMessage
from shared.state import DeviceState
from shared.topics import TopicKind
from tests.support.telemetry import T0, add_devices, ingest, window


def _at(message: DeviceMessage, received_at: datetime) -> DeviceMessage:
    return dataclasses.replace(message, received_at=received_at)


def _last_seen(engine: sa.Engine, device_id: str) -> datetime | None:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return as_utc(device.last_seen)


def test_last_seen_moves_in_steps_for_telemetry_and_always_for_state(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    (a,) = add_devices(engine, f"seen-{T0.timestamp():.0f}-{datetime.now(UTC).timestamp()}")
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    ingest(engine, [_at(window(a, T0, {3: 1}, seq=1), t)])
    assert _last_seen(engine, a) == t  # never seen before: written

    soon = t + LAST_SEEN_RESOLUTION - timedelta(seconds=1)
    ingest(engine, [_at(window(a, T0 + timedelta(seconds=10), {3: 1}, seq=2), soon)])
    assert _last_seen(engine, a) == t  # telemetry alone, too soon: the device row is left alone

    later = t + LAST_SEEN_RESOLUTION
    ingest(engine, [_at(window(a, T0 + timedelta(seconds=20), {3: 1}, seq=3), later)])
    assert _last_seen(engine, a) == later

    state = StateMessage.wrap(DeviceState(device_id=a, phase="committed"))
    right_after = later + timedelta(seconds=1)
    ingest(engine, [DeviceMessage(a, TopicKind.STATE, state, "test/state", right_after)])
    assert _last_seen(engine, a) == right_after  # a state report changes the row anyway
