"""Rollout rules driven through the controller directly: variants, newcomers, manual promotion, leader lock."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.models import DesiredStateRow, Device, Rollout, RolloutDevice, TelemetryRecord, utcnow
from control_plane.rollouts import assign
from control_plane.rollouts.controller import RolloutController
from control_plane.rollouts.leader import LeaderLock
from shared.telemetry import REQUEST_DURATION_BUCKETS

NO_WAIT = {"min_samples": 1, "max_p95_latency_ratio": None, "warmup_windows": 0}


def _device(client: TestClient, admin: dict[str, str], name: str, **hardware: object) -> str:
    created = client.post("/v1/devices", json={"name": name, "labels": {"fleet": "t"}}, headers=admin).json()
    hw = {"ram_mb": 4096, "arch": "x86_64", **hardware}
    return str(
        client.post(
            "/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"], "hardware": hw}
        ).json()["device_id"]
    )


def _reference(sha_char: str, **extra: object) -> dict[str, object]:
    return {
        "url": f"https://models.example/{sha_char}.gguf",
        "sha256": sha_char * 64,
        "size_bytes": 1000,
        "format": "gguf",
        **extra,
    }


def _version(client: TestClient, op: dict[str, str], version: str, artifacts: list[dict[str, object]]) -> None:
    first, *rest = artifacts
    r = client.post("/v1/models/m/versions", json={"version": version, "artifact": first}, headers=op)
    assert r.status_code == 201, r.text
    for artifact in rest:
        assert client.post(f"/v1/models/m/versions/{version}/artifacts", json=artifact, headers=op).status_code == 201


def _report_active(engine, device_ids: list[str], version: str, p95_s: float = 0.03) -> None:  # type: ignore[no-untyped-def]
    """Stand in for the devices: each reports its desired artifact as committed, with telemetry."""
    with Session(engine) as session:
        for device_id in device_ids:
            desired = session.get(DesiredStateRow, device_id)
            device = session.get(Device, device_id)
            assert desired is not None and device is not None
            device.status, device.phase = "online", "committed"
            device.current_sha256, device.current_version = desired.artifact_sha256, desired.version
            device.acked_message_id = desired.message_id
            counts = [0] * (len(REQUEST_DURATION_BUCKETS) + 1)
            counts[next(i for i, b in enumerate(REQUEST_DURATION_BUCKETS) if p95_s <= b)] = 10
            now = utcnow()
            session.add(device)
            session.add(
                TelemetryRecord(
                    device_id=device_id,
                    message_id=str(uuid.uuid4()),
                    seq=1,
                    window_start=now - timedelta(seconds=1),
                    window_end=now,
                    version=version,
                    requests=10,
                    latency_histogram={"bounds": list(REQUEST_DURATION_BUCKETS), "counts": counts},
                )
            )
        session.commit()


def _tick(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine, expire_on_commit=False) as session:
        RolloutController().tick(session)


def _members(engine, rollout_id: str) -> dict[str, RolloutDevice]:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return {
            m.device_id: m for m in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        }


def test_each_device_gets_the_best_fitting_variant_or_is_marked_incompatible(
    client, engine, admin_headers, operator_headers
):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(
        client,
        operator_headers,
        "1",
        [
            _reference("a", quantization="F32", min_ram_mb=8192),
            _reference("b", quantization="Q4_K_M", min_ram_mb=1024),
            _reference("c", quantization="F16", accelerators=["cuda"], min_ram_mb=2048),
            _reference("d", quantization="Q8_0", min_ram_mb=2048, cpu_arch=["aarch64"]),
        ],
    )
    big = _device(client, admin_headers, "big", ram_mb=16384)
    small = _device(client, admin_headers, "small", ram_mb=1500)
    gpu = _device(client, admin_headers, "gpu", ram_mb=4096, accelerators=["cuda"])
    arm = _device(client, admin_headers, "arm", ram_mb=4096, arch="aarch64")
    tiny = _device(client, admin_headers, "tiny", ram_mb=256)
    plan = {
        "model": "m",
        "version": "1",
        "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
        "gates": NO_WAIT,
    }
    rollout = client.post("/v1/rollouts", json=plan, headers=operator_headers).json()
    _tick(engine)
    members = _members(engine, rollout["id"])
    assert members[big].artifact_sha256 == "a" * 64  # the highest quality that fits
    assert members[small].artifact_sha256 == "b" * 64
    assert members[gpu].artifact_sha256 == "c" * 64  # an accelerated variant when the device has one
    assert members[arm].artifact_sha256 == "d" * 64  # Q8_0 beats Q4_K_M; F32 needs more RAM
    assert members[tiny].status == "incompatible" and "256" in members[tiny].reason
    shown = client.get(f"/v1/rollouts/{rollout['id']}", headers=operator_headers).json()
    assert shown["devices"]["incompatible"] == 1
    assert any(d["status"] == "incompatible" for d in shown["device_details"])


def test_newcomers_get_the_stable_version_until_the_rollout_completes(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(client, operator_headers, "1", [_reference("a")])
    _version(client, operator_headers, "2", [_reference("b")])
    first = _device(client, admin_headers, "first")
    one_stage = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}
    r1 = client.post("/v1/rollouts", json={"model": "m", "version": "1", **one_stage}, headers=operator_headers).json()
    _tick(engine)
    _report_active(engine, [first], "1")
    _tick(engine)
    assert client.get(f"/v1/rollouts/{r1['id']}", headers=operator_headers).json()["state"] == "completed"

    manual = {
        **one_stage,
        "stages": [{"name": "canary", "count": 1, "min_bake_s": 0}, {"name": "all", "percent": 100, "min_bake_s": 0}],
        "promotion": "manual",
    }
    r2 = client.post("/v1/rollouts", json={"model": "m", "version": "2", **manual}, headers=operator_headers).json()
    _tick(engine)
    late = _device(client, admin_headers, "late")  # enrolls during the rollout
    _tick(engine)
    with Session(engine) as session:
        assert session.get(DesiredStateRow, late).version == "1"  # type: ignore[union-attr]
    _report_active(engine, [first], "2")
    _tick(engine)
    waiting = client.get(f"/v1/rollouts/{r2['id']}", headers=operator_headers).json()
    assert waiting["state"] == "waiting_promotion"
    promoted = client.post(f"/v1/rollouts/{r2['id']}/promote", headers=operator_headers).json()
    assert promoted["state"] == "running" and promoted["stage"] == "all"
    again = client.post(f"/v1/rollouts/{r2['id']}/promote", headers=operator_headers)
    assert again.status_code == 409 and again.json()["code"] == "invalid_state"
    _tick(engine)
    _report_active(engine, [first], "2")
    _tick(engine)
    assert client.get(f"/v1/rollouts/{r2['id']}", headers=operator_headers).json()["state"] == "completed"
    with Session(engine) as session:  # the newcomer follows the fleet now
        assert session.get(DesiredStateRow, late).version == "2"  # type: ignore[union-attr]


def test_only_one_controller_holds_the_lock(engine, tmp_path):  # type: ignore[no-untyped-def]
    first, second = LeaderLock(engine, tmp_path), LeaderLock(engine, tmp_path)
    try:
        assert first.try_acquire()
        assert not second.try_acquire()
        first.release()
        assert second.try_acquire()
    finally:
        first.release()
        second.release()


def test_creating_a_rollout_assigns_its_first_stage_in_the_same_request(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers
):
    """No controller tick runs here: the POST itself writes the first stage, ready to publish,
    and keeps each canary's previous desired state for a rollback."""
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(client, operator_headers, "1", [_reference("a")])
    _version(client, operator_headers, "2", [_reference("b")])
    devices = [_device(client, admin_headers, f"d{i}") for i in range(10)]
    everyone = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}
    r1 = client.post("/v1/rollouts", json={"model": "m", "version": "1", **everyone}, headers=operator_headers)
    assert r1.status_code == 201 and r1.json()["devices"] == {"assigned": 10}
    with Session(engine) as session:
        v1 = {d: session.get(DesiredStateRow, d) for d in devices}
        assert {row.version for row in v1.values() if row} == {"1"} and None not in v1.values()
        assert all(m.previous_desired is None for m in _members(engine, r1.json()["id"]).values())
        pending = {d for d, _, _ in assign.pending_publication(session)}
    assert pending == set(devices)
    _report_active(engine, devices, "1")
    _tick(engine)

    canary = {"stages": [{"name": "canary", "count": 3, "min_bake_s": 0}, everyone["stages"][0]], "gates": NO_WAIT}
    r2 = client.post("/v1/rollouts", json={"model": "m", "version": "2", **canary}, headers=operator_headers).json()
    assert r2["devices"] == {"assigned": 3, "waiting": 7} and r2["baseline_version"] == "1"
    members = _members(engine, r2["id"])
    canaries = [d for d, m in members.items() if m.status == "assigned"]
    with Session(engine) as session:
        for device_id in devices:
            row = session.get(DesiredStateRow, device_id)
            assert row is not None and row.version == ("2" if device_id in canaries else "1")
            assert (row.rollout_id == r2["id"]) == (device_id in canaries)
    for device_id in canaries:  # what a rollback restores: the v1 state, message id and all
        previous = members[device_id].previous_desired
        assert previous is not None and previous["message_id"] == v1[device_id].message_id  # type: ignore[union-attr]
        assert previous["version"] == "1"
    assert all(members[d].previous_desired is None for d in devices if d not in canaries)

    # The next stage is the controller's: its members keep their previous desired state too.
    _report_active(engine, canaries, "2")
    _tick(engine)  # gates pass: next stage
    _tick(engine)  # assigns it
    members = _members(engine, r2["id"])
    assert {m.status for d, m in members.items() if d not in canaries} == {"assigned"}
    for device_id in devices:
        previous = members[device_id].previous_desired
        assert previous is not None and previous["message_id"] == v1[device_id].message_id  # type: ignore[union-attr]


def test_an_abort_waits_for_the_controller_step_it_races_and_rolls_back_what_that_step_assigned(
    client, engine, admin_headers, operator_headers
):  # type: ignore[no-untyped-def]
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks between replicas' sessions: PostgreSQL (SQLite has a single writer)")
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(client, operator_headers, "1", [_reference("a")])
    devices = [_device(client, admin_headers, f"race-{i}") for i in range(4)]
    stages = [{"name": "canary", "count": 1, "min_bake_s": 0}, {"name": "all", "percent": 100, "min_bake_s": 0}]
    plan = {"model": "m", "version": "1", "stages": stages, "gates": NO_WAIT, "promotion": "manual"}
    rollout = client.post("/v1/rollouts", json=plan, headers=operator_headers).json()
    assert client.post(f"/v1/rollouts/{rollout['id']}/promote", headers=operator_headers).status_code == 200
    aborted: dict[str, object] = {}
    with Session(engine, expire_on_commit=False) as session:
        step = session.get(Rollout, rollout["id"])
        RolloutController().advance(session, step)  # assigns the last stage's 3 devices, not committed yet
        abort = f"/v1/rollouts/{rollout['id']}/abort"
        operator = threading.Thread(target=lambda: aborted.update(r=client.post(abort, headers=operator_headers)))
        operator.start()
        operator.join(1.0)
        assert operator.is_alive(), "the abort must wait for the controller's step on the same rollout"
        session.commit()
    operator.join(15)
    assert aborted["r"].status_code == 200  # type: ignore[attr-defined]
    # The abort saw the step's assignments: every device it touched is rolled back, the last three too.
    members = _members(engine, rollout["id"])
    assert set(members) == set(devices) and {m.status for m in members.values()} == {"rolled_back"}


def test_rolling_back_a_devices_first_model_withdraws_it(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    """Devices whose first desired state came with the rollout have nothing to go back to: an
    abort sends them an `unload` desired state (outside any rollout), published like any other,
    and the fleet summary counts them on their desired state once they serve nothing."""
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(client, operator_headers, "1", [_reference("a")])
    devices = [_device(client, admin_headers, f"d{i}") for i in range(3)]
    everyone = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}
    rollout = client.post("/v1/rollouts", json={"model": "m", "version": "1", **everyone}, headers=operator_headers)
    assert rollout.status_code == 201, rollout.text
    _report_active(engine, devices, "1")
    with Session(engine) as session:
        served = {d: session.get(DesiredStateRow, d).message_id for d in devices}  # type: ignore[union-attr]
    aborted = client.post(f"/v1/rollouts/{rollout.json()['id']}/abort", headers=operator_headers)
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborted", aborted.text

    with Session(engine) as session:
        rows = {d: session.get(DesiredStateRow, d) for d in devices}
        pending = {d for d, _, _ in assign.pending_publication(session)}
    for device_id, row in rows.items():
        assert row is not None and row.unload and row.payload["unload"] is True
        assert row.rollout_id is None and row.payload["rollout_id"] is None
        assert row.version == "1" and row.message_id != served[device_id]
    assert pending == set(devices)  # to be published, retained, as every desired state is
    summary = client.get("/v1/telemetry/summary", headers=operator_headers).json()
    assert summary["not_on_desired"]["count"] == 3  # still serving the withdrawn version
    assert {d["desired_version"] for d in summary["not_on_desired"]["devices"]} == {None}

    with Session(engine) as session:  # the devices unload and acknowledge
        for device_id in devices[:2]:
            device = session.get(Device, device_id)
            assert device is not None
            device.current_sha256 = device.current_version = None
            device.phase, device.acked_message_id = "idle", rows[device_id].message_id  # type: ignore[union-attr]
            session.add(device)
        session.commit()
    summary = client.get("/v1/telemetry/summary", headers=operator_headers).json()
    assert summary["not_on_desired"]["count"] == 1
    assert [d["device_id"] for d in summary["not_on_desired"]["devices"]] == [devices[2]]
