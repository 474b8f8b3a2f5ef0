"""Staged rollouts end to end over the real Mosquitto: canary -> fleet, gates, automatic rollback."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel, select

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import GateEvaluation
from control_plane.rollouts import assign
from shared.topics import Topics
from tests.support.fleet import enroll_devices, upload_version
from tests.support.simulated import TelemetryPump, sim_config, start_sim_devices
from tests.support.waiting import wait_for

MOSQUITTO = "mqtt://127.0.0.1:1883"
LATENCY_MS = {"1": 40.0, "2": 42.0, "3": 200.0}
FAST_PLAN = {
    "stages": [
        {"name": "canary", "count": 1, "min_bake_s": 0.3},
        {"name": "fleet", "percent": 100, "min_bake_s": 0.3},
    ],
    "gates": {"min_samples": 10, "max_p95_latency_ratio": 1.5, "max_error_rate": 0.05},
}


def _control_plane(tmp_path, db_url, engine, tick_s: float) -> Iterator[tuple[TestClient, Settings]]:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=tick_s,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        yield client, settings
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def fleet(tmp_path, db_url, engine) -> Iterator[tuple[TestClient, Settings]]:  # type: ignore[no-untyped-def]
    yield from _control_plane(tmp_path, db_url, engine, tick_s=0.1)


@pytest.fixture
def slow_ticking_fleet(tmp_path, db_url, engine) -> Iterator[tuple[TestClient, Settings]]:  # type: ignore[no-untyped-def]
    yield from _control_plane(tmp_path, db_url, engine, tick_s=60)


def _token(engine: sa.Engine, role: str) -> dict[str, str]:
    from control_plane.models import Role
    from control_plane.services import auth

    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name=role, role=Role[role])
        session.commit()
    return {"Authorization": f"Bearer {plaintext}"}


def _rollout(client: TestClient, headers: dict[str, str], version: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/rollouts", json={"model": "tiny", "version": version, **FAST_PLAN}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _finished(client: TestClient, headers: dict[str, str], rollout_id: str) -> dict | None:  # type: ignore[type-arg]
    body = client.get(f"/v1/rollouts/{rollout_id}", headers=headers).json()
    return body if body["state"] in ("completed", "rolled_back", "aborted") else None


def _all_online(client: TestClient, headers: dict[str, str]) -> bool:
    return all(d["status"] == "online" for d in client.get("/v1/devices", headers=headers).json()["data"])


def _on_version(client: TestClient, headers: dict[str, str], version: str) -> list[dict]:  # type: ignore[type-arg]
    return client.get("/v1/devices", params={"current_version": version}, headers=headers).json()["data"]  # type: ignore[no-any-return]


@pytest.mark.mosquitto
def test_canary_to_fleet_then_latency_regression_rolls_back(fleet, engine, tiny_gguf, tiny_gguf_other, tmp_path):  # type: ignore[no-untyped-def]
    client, settings = fleet
    admin, operator = _token(engine, "admin"), _token(engine, "operator")
    assert client.post("/v1/models", json={"name": "tiny"}, headers=operator).status_code == 201
    from slmops.tinymodels.gguf_tiny import write_tiny_gguf

    v3 = write_tiny_gguf(tmp_path / "v3.gguf", seed=3)
    for version, path in (("1", tiny_gguf), ("2", tiny_gguf_other), ("3", v3)):
        upload_version(client, operator, "tiny", version, path)
    creds = enroll_devices(client, admin, [(f"dev-{i}", {"region": "eu", "i": str(i)}) for i in range(4)])
    behaviour = sim_config(latency_ms=lambda v: LATENCY_MS[v], requests_per_window=10)
    devices = start_sim_devices(MOSQUITTO, Topics(settings.mqtt_topic_prefix), creds, behaviour)
    try:
        with TelemetryPump(devices):
            wait_for(lambda: _all_online(client, operator), what="devices online")
            first = _rollout(client, operator, "1")
            done = wait_for(lambda: _finished(client, operator, first["id"]), what="v1 rollout")
            assert done["state"] == "completed", done
            assert {d.current_version for d in devices} == {"1"}

            second = _rollout(client, operator, "2")
            assert second["baseline_version"] == "1"
            # The canary stage holds exactly one device first.
            canary = wait_for(lambda: [d for d in devices if d.current_version == "2"], what="canary on v2")
            assert len(canary) == 1
            done = wait_for(lambda: _finished(client, operator, second["id"]), what="v2 rollout")
            assert done["state"] == "completed", done
            assert {d.current_version for d in devices} == {"2"}

            third = _rollout(client, operator, "3")
            conflict = client.post("/v1/rollouts", json={"model": "tiny", "version": "1"}, headers=operator)
            assert conflict.status_code == 409 and conflict.json()["code"] == "rollout_conflict"
            done = wait_for(lambda: _finished(client, operator, third["id"]), what="v3 rollout")
            assert done["state"] == "rolled_back", done
            assert "max_p95_latency_ratio" in done["reason"]
            # Every device that touched v3 returns to v2.
            wait_for(lambda: {d.current_version for d in devices} == {"2"}, what="devices back on v2")
            wait_for(lambda: len(_on_version(client, operator, "2")) == 4, what="control plane sees all on v2")
            wait_for(lambda: _unpublished(engine) == [], what="every desired state marked published")
    finally:
        for device in devices:
            device.stop()
    with Session(engine) as session:
        failed = session.exec(
            select(GateEvaluation).where(GateEvaluation.rollout_id == third["id"], GateEvaluation.result == "fail")
        ).all()
    assert failed, "the failing evaluation is stored"
    ratio = next(c for c in failed[0].details["checks"] if c["gate"] == "max_p95_latency_ratio")
    assert ratio["value"] > 1.5 and ratio["limit"] == 1.5
    assert failed[0].details["baseline"]["version"] == "2"


def _unpublished(engine: sa.Engine) -> list[tuple[str, str, str]]:
    with Session(engine) as session:
        return assign.pending_publication(session)


@pytest.mark.mosquitto
def test_device_enrolled_after_a_completed_rollout_gets_its_version(fleet, engine, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    client, settings = fleet
    admin, operator = _token(engine, "admin"), _token(engine, "operator")
    assert client.post("/v1/models", json={"name": "tiny"}, headers=operator).status_code == 201
    for version, path in (("1", tiny_gguf), ("2", tiny_gguf_other)):
        upload_version(client, operator, "tiny", version, path)
    topics = Topics(settings.mqtt_topic_prefix)
    behaviour = sim_config(requests_per_window=10)
    creds = enroll_devices(client, admin, [("eu-1", {"region": "eu"}), ("us-1", {"region": "us"})])
    devices = start_sim_devices(MOSQUITTO, topics, creds, behaviour)
    try:
        with TelemetryPump(devices):
            wait_for(lambda: _all_online(client, operator), what="devices online")
            plan = {"model": "tiny", "selector": "region=eu", **FAST_PLAN}
            eu = client.post("/v1/rollouts", json={**plan, "version": "2"}, headers=operator).json()
            done = wait_for(lambda: _finished(client, operator, eu["id"]), what="v2 to region=eu")
            assert done["state"] == "completed", done
            # Enrolled afterwards: one matching the completed rollout's selector, one not.
            late = enroll_devices(client, admin, [("eu-2", {"region": "eu"}), ("ap-1", {"region": "ap"})])
            devices += start_sim_devices(MOSQUITTO, topics, late, behaviour)
            wait_for(lambda: devices[2].current_version == "2", what="late eu device on v2")
            time.sleep(1.0)  # several controller ticks
            assert devices[3].current_version is None, "a device no completed rollout selects gets nothing"
            assert devices[1].current_version is None
    finally:
        for device in devices:
            device.stop()


@pytest.mark.mosquitto
def test_a_new_rollout_is_published_at_once_and_decided_at_a_tick(slow_ticking_fleet, engine, tiny_gguf):  # type: ignore[no-untyped-def]
    # Ticks 60 s apart: the first stage reaches the devices without one; a tick-waking call
    # (resume) decides the stage straight away.
    client, settings = slow_ticking_fleet
    admin, operator = _token(engine, "admin"), _token(engine, "operator")
    assert client.post("/v1/models", json={"name": "tiny"}, headers=operator).status_code == 201
    upload_version(client, operator, "tiny", "1", tiny_gguf)
    creds = enroll_devices(client, admin, [("a-1", {}), ("a-2", {})])
    devices = start_sim_devices(MOSQUITTO, Topics(settings.mqtt_topic_prefix), creds, sim_config())
    try:
        wait_for(lambda: _all_online(client, operator), what="devices online")
        gates = {"min_activated_fraction": 1.0, "max_error_rate": None, "max_p95_latency_ratio": None}
        plan = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": gates}
        rollout = client.post("/v1/rollouts", json={"model": "tiny", "version": "1", **plan}, headers=operator).json()
        wait_for(lambda: len(_on_version(client, operator, "1")) == 2, timeout_s=20, what="both devices on v1")
        assert client.get(f"/v1/rollouts/{rollout['id']}", headers=operator).json()["state"] == "running"
        # No tick has looked at it: a tick right after the POST would have stored an evaluation.
        assert client.get(f"/v1/rollouts/{rollout['id']}/evaluations", headers=operator).json() == []
        for action in ("pause", "resume"):
            assert client.post(f"/v1/rollouts/{rollout['id']}/{action}", headers=operator).status_code == 200
        done = wait_for(lambda: _finished(client, operator, rollout["id"]), timeout_s=20, what="the rollout decided")
        assert done["state"] == "completed", done
    finally:
        for device in devices:
            device.stop()
