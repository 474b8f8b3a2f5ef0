"""When and how fast: maintenance windows, the rollout rate and the abort threshold, on an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlmodel import Session, select

from control_plane.models import DesiredStateRow, Device, Rollout, RolloutDevice, as_utc, utcnow
from control_plane.rollouts.controller import RolloutController
from tests.support.lifecycle import NO_WAIT, desired_version, enrolled_device, referenced_version, tick
from tests.test_rollout_rules import _report_active


def _at(when: datetime) -> RolloutController:
    return RolloutController(clock=lambda: when)


def _hhmm(when: datetime) -> str:
    return when.strftime("%H:%M")


def _start(client, op, **plan: object) -> dict:  # type: ignore[no-untyped-def, type-arg]
    body = {"model": "m", "version": "1", "gates": NO_WAIT, **plan}
    r = client.post("/v1/rollouts", json=body, headers=op)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _created(engine, rollout_id: str) -> datetime:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        return as_utc(rollout.stage_started_at)  # type: ignore[return-value]


def _state(client, op, rollout_id: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return client.get(f"/v1/rollouts/{rollout_id}", headers=op).json()  # type: ignore[no-any-return]


def _model(client, op) -> None:  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=op)
    referenced_version(client, op, "m", "1", "a")


def test_devices_outside_their_window_wait_until_it_opens(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    here = enrolled_device(client, admin_headers, "stockholm-free")["device_id"]
    tokyo = enrolled_device(client, admin_headers, "tokyo", tz="Asia/Tokyo")["device_id"]
    now = utcnow().replace(second=0, microsecond=0)
    window = {"start": _hhmm(now + timedelta(hours=2)), "end": _hhmm(now + timedelta(hours=4))}
    stages = [{"name": "all", "percent": 100, "min_bake_s": 0}]
    rollout = _start(client, operator_headers, stages=stages, maintenance={"windows": [window], "timezone": "UTC"})
    assert rollout["devices"] == {"waiting_window": 2}
    tick(engine, _at(now + timedelta(hours=1)))
    assert _state(client, operator_headers, rollout["id"])["devices"] == {"waiting_window": 2}
    assert desired_version(engine, here) is None

    tick(engine, _at(now + timedelta(hours=2, minutes=1)))
    assert desired_version(engine, here) == "1" and desired_version(engine, tokyo) is None
    assert _state(client, operator_headers, rollout["id"])["devices"] == {"assigned": 1, "waiting_window": 1}
    # The same wall-clock window in Tokyo (UTC+9) opens nine hours earlier, so next at +17 h.
    tick(engine, _at(now + timedelta(hours=16, minutes=55)))
    assert desired_version(engine, tokyo) is None
    tick(engine, _at(now + timedelta(hours=17, minutes=1)))
    assert desired_version(engine, tokyo) == "1"


def test_bake_time_counts_only_inside_the_window(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    device = enrolled_device(client, admin_headers, "d")["device_id"]
    now = utcnow().replace(second=0, microsecond=0)
    window = {"start": _hhmm(now - timedelta(minutes=10)), "end": _hhmm(now + timedelta(minutes=40))}
    stages = [{"name": "all", "percent": 100, "min_bake_s": 3600}]
    rollout = _start(client, operator_headers, stages=stages, maintenance={"windows": [window]})
    assert rollout["devices"] == {"assigned": 1}
    started = _created(engine, rollout["id"])
    _report_active(engine, [device], "1")
    # About 40 minutes inside today's window, then closed until it opens again at +23 h 50 min.
    for after in (timedelta(minutes=30), timedelta(hours=5), timedelta(hours=23), timedelta(hours=24, minutes=5)):
        tick(engine, _at(started + after))
        assert _state(client, operator_headers, rollout["id"])["state"] == "running", after
    tick(engine, _at(started + timedelta(hours=24, minutes=15)))  # 40 + 25 minutes inside: baked
    assert _state(client, operator_headers, rollout["id"])["state"] == "completed"


def test_the_rollout_rate_holds_within_ten_percent(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    for i in range(60):
        enrolled_device(client, admin_headers, f"d{i:02d}")
    stages = [{"name": "all", "percent": 100, "min_bake_s": 0}]
    rollout = _start(client, operator_headers, stages=stages, max_per_minute=20)
    assert rollout["devices"] == {"assigned": 1, "waiting": 59}
    started = _created(engine, rollout["id"])
    for second in range(1, 151):
        tick(engine, _at(started + timedelta(seconds=second)))
    with Session(engine) as session:
        times = sorted(
            as_utc(t)
            for t in session.exec(
                select(RolloutDevice.assigned_at).where(
                    RolloutDevice.rollout_id == rollout["id"],
                    RolloutDevice.assigned_at.is_not(None),  # type: ignore[union-attr]
                )
            )
        )
    assert 45 <= len(times) < 60  # paced, not all at once
    measured = (len(times) - 1) / ((times[-1] - times[0]).total_seconds() / 60)  # type: ignore[operator]
    assert abs(measured - 20) <= 2, measured


def _fail(engine, device_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        for device_id in device_ids:
            device, desired = session.get(Device, device_id), session.get(DesiredStateRow, device_id)
            assert device is not None and desired is not None
            device.status, device.phase, device.phase_reason = "online", "activation_failed", "model did not load"
            device.acked_message_id = desired.message_id
            session.add(device)
        session.commit()


def test_failed_activations_past_the_threshold_abort_the_rollout(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    referenced_version(client, operator_headers, "m", "2", "b")
    devices = [enrolled_device(client, admin_headers, f"d{i}")["device_id"] for i in range(4)]
    stages = [{"name": "all", "percent": 100, "min_bake_s": 0}]
    first = _start(client, operator_headers, stages=stages)
    _report_active(engine, devices, "1")
    tick(engine)
    assert _state(client, operator_headers, first["id"])["state"] == "completed"
    tolerant = {**NO_WAIT, "min_activated_fraction": 0}
    second = _start(
        client,
        operator_headers,
        version="2",
        stages=stages,
        gates=tolerant,
        abort={"failed_percent": 50, "min_failed": 2},
    )
    _fail(engine, devices[:1])
    tick(engine)
    assert _state(client, operator_headers, second["id"])["state"] == "running"  # 1 failure: under the minimum
    _fail(engine, devices[1:2])
    tick(engine)
    aborted = _state(client, operator_headers, second["id"])
    assert aborted["state"] == "aborted" and aborted["reason"].startswith("abort threshold: 2 of 4")
    assert [desired_version(engine, d) for d in devices] == ["1"] * 4
