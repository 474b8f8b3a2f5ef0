"""The newest report wins: a replica that stores a device's older state or status after a newer one
(it lagged, or a redelivery reached it late) leaves the newer one in place, on both databases."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, DeviceStatus
from control_plane.services import devices
from shared.enrollment import EnrollRequest
from shared.hardware import HardwareProfile
from shared.messages import StateMessage, StatusMessage
from shared.state import DeviceState, ModelRef
from shared.topics import TopicKind
from tests.support.telemetry import add_devices
from tests.support.waiting import wait_for

_ROW = ("status", "hardware", "phase", "current_version", "acked_message_id", "state_seq", "status_seq")


def _device(engine: sa.Engine, **fields: Any) -> str:
    (device_id,) = add_devices(engine, f"order-{datetime.now(UTC).timestamp()}", **fields)
    return device_id


def _ref(version: str) -> ModelRef:
    return ModelRef(model="tiny", version=version, sha256="a" * 64, format="gguf")


def _state(device_id: str, version: str, seq: int | None, phase: str = "committed") -> DeviceMessage:
    state = DeviceState(device_id=device_id, phase=phase, current=_ref(version), desired_message_id=f"m{version}")  # type: ignore[arg-type]
    message = StateMessage.wrap(state).model_copy(update={"report_seq": seq})
    return DeviceMessage(device_id, TopicKind.STATE, message, "test/state", datetime.now(UTC))


def _status(device_id: str, status: str, seq: int | None, cpu: str | None = None) -> DeviceMessage:
    hardware = HardwareProfile(cpu_model=cpu) if cpu else None
    message = StatusMessage(status=status, report_seq=seq, hardware=hardware)  # type: ignore[arg-type]
    return DeviceMessage(device_id, TopicKind.STATUS, message, "test/status", datetime.now(UTC))


def _row(engine: sa.Engine, device_id: str) -> dict[str, Any]:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        return {name: getattr(device, name, None) for name in _ROW}


def test_an_older_state_stored_after_a_newer_one_leaves_the_newer(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    device = _device(engine)
    IngestWriter(engine)([_state(device, "2", seq=200)])  # the replica that kept up
    IngestWriter(engine)([_state(device, "1", seq=100, phase="on_trial")])  # the one that lagged
    row = _row(engine, device)
    assert (row["current_version"], row["phase"], row["acked_message_id"]) == ("2", "committed", "m2")


def test_an_older_state_later_in_one_batch_leaves_the_newer(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    device = _device(engine)
    IngestWriter(engine)([_state(device, "2", seq=200), _state(device, "1", seq=100)])
    assert _row(engine, device)["current_version"] == "2"


def test_the_offline_of_a_connection_wins_over_its_birth_stored_late(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    # One connection's birth and will carry the same seq; offline ranks after online.
    device = _device(engine, status=DeviceStatus.offline)
    IngestWriter(engine)([_status(device, "offline", seq=50)])
    IngestWriter(engine)([_status(device, "online", seq=50)])  # the lagging replica's birth
    assert _row(engine, device)["status"] == DeviceStatus.offline
    IngestWriter(engine)([_status(device, "online", seq=60)])  # the next connection
    IngestWriter(engine)([_status(device, "offline", seq=50)])  # the old will, redelivered
    assert _row(engine, device)["status"] == DeviceStatus.online


def test_reports_without_a_seq_from_older_agents_are_stored_as_they_come(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    device = _device(engine, status=DeviceStatus.offline)
    IngestWriter(engine)([_state(device, "2", seq=200)])
    IngestWriter(engine)([_state(device, "1", seq=None)])  # an agent downgraded to one without seqs
    row = _row(engine, device)
    assert (row["current_version"], row["state_seq"]) == ("1", None)
    assert row["status"] == DeviceStatus.online  # an unordered state still says the device is connected
    IngestWriter(engine)([_state(device, "3", seq=5)])  # upgraded again: whatever seq it starts from
    assert _row(engine, device)["current_version"] == "3"


def test_two_ingest_instances_fed_opposite_orders_end_with_the_same_row(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for order in (1, -1):
        device = _device(engine, status=DeviceStatus.offline)
        reports = [
            _status(device, "online", seq=10, cpu="before the upgrade"),
            _state(device, "1", seq=11, phase="on_trial"),
            _state(device, "1", seq=12),
            _status(device, "offline", seq=10),
            _status(device, "online", seq=20, cpu="after"),
            _state(device, "2", seq=21),
        ][::order]
        first, second = IngestWriter(engine), IngestWriter(engine)  # two replicas, interleaved
        for writer, report in zip(itertools.cycle((first, second)), reports, strict=False):
            writer([report])
        rows.append(_row(engine, device))
    assert rows[0] == rows[1]
    assert (rows[0]["status"], rows[0]["current_version"], rows[0]["phase"]) == (DeviceStatus.online, "2", "committed")
    assert rows[0]["hardware"]["cpu_model"] == "after"  # the birth's hardware goes with its status


class _HeldWriter(IngestWriter):
    """The real ingest, holding its transaction open after its device update until `go` is set."""

    def __init__(self, engine: sa.Engine, updated: threading.Event, go: threading.Event) -> None:
        super().__init__(engine)
        self.updated, self.go = updated, go

    def _update_devices(self, session: Session, changes: dict[str, dict[str, Any]]) -> None:  # type: ignore[override]
        IngestWriter._update_devices(session, changes)
        self.updated.set()
        assert self.go.wait(30)


def _waiting_on_a_lock(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return bool(conn.execute(sa.text(query)).scalar())


def test_a_lagging_write_racing_a_newer_uncommitted_one_leaves_the_newer(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    # The comparison is in the UPDATE itself: the lagging replica read the row before the newer
    # report committed, and PostgreSQL re-evaluates its UPDATE on the row as committed.
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: no two transactions update a row concurrently")
    device = _device(engine)
    updated, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run(write: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    newer = run(lambda: _HeldWriter(engine, updated, go)([_state(device, "2", seq=200)]))
    assert updated.wait(30)
    lagging = run(lambda: IngestWriter(engine)([_state(device, "1", seq=100, phase="on_trial")]))
    try:
        wait_for(lambda: _waiting_on_a_lock(engine), timeout_s=30)  # blocked on the row
    finally:
        go.set()
        newer.join(30)
        lagging.join(30)
    assert not errors
    assert _row(engine, device)["current_version"] == "2"


def test_a_reenrolled_device_may_order_its_reports_from_scratch(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        device, token = devices.create_device(
            session, name=f"reflashed-{datetime.now(UTC).timestamp()}", labels={}, created_by="t", token_ttl_s=600
        )
        devices.enroll(session, EnrollRequest(enrollment_token=token))
        session.commit()
        device_id = device.id
    IngestWriter(engine)([_status(device_id, "online", seq=10**15), _state(device_id, "2", seq=10**15 + 1)])
    with Session(engine) as session:  # reflashed: its clock state lost, a new token, enrolled again
        token = devices.reissue_enrollment_token(session, devices.get_device(session, device_id), 600)
        devices.enroll(session, EnrollRequest(enrollment_token=token))
        session.commit()
    IngestWriter(engine)([_status(device_id, "online", seq=5), _state(device_id, "1", seq=6)])
    row = _row(engine, device_id)
    assert (row["status"], row["current_version"], row["state_seq"]) == (DeviceStatus.online, "1", 6)
