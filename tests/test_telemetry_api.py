"""`/v1/telemetry`: numbers from real ingested windows, before and after the rollup, and roles."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.models import (
    DesiredStateRow,
    Device,
    DeviceStatus,
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
    RolloutDevice,
)
from control_plane.telemetry.rollup import RetentionPolicy, run_rollup
from tests.support.fleet import enroll_devices
from tests.support.telemetry import T0, add_devices, ingest, window

KEEP_ALL = RetentionPolicy(raw_s=30 * 86400, minute_s=60 * 86400, hour_s=400 * 86400)
RANGE = {"start": T0.isoformat(), "end": (T0 + timedelta(minutes=2)).isoformat()}


def _ingest_known(engine: sa.Engine) -> tuple[str, str]:
    a, b = add_devices(engine, "dev-a", "dev-b")
    ingest(
        engine,
        [
            window(a, T0 + timedelta(seconds=10), {3: 10}, ttft_s=0.02, tokens_per_s=30.0),
            window(b, T0 + timedelta(seconds=20), {5: 10}, errors=2, ttft_s=0.06, tokens_per_s=10.0),
            window(a, T0 + timedelta(seconds=70), {4: 5}),
            window(a, T0 + timedelta(seconds=80), {9: 3}, version="2"),  # another version: not in v1's series
        ],
    )
    return a, b


def _versions(client, headers, step: str, **extra: Any) -> dict:  # type: ignore[no-untyped-def,type-arg]
    params = {"model": "tiny", "version": "1", "step": step, **RANGE, **extra}
    response = client.get("/v1/telemetry/versions", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _latency(point: dict) -> tuple:  # type: ignore[type-arg]
    return point["requests"], point["latency_p50_ms"], point["latency_p95_ms"], point["latency_p99_ms"]


def test_version_series_same_numbers_from_raw_and_from_rollups(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    _ingest_known(engine)
    raw = _versions(client, viewer_headers, "1m")
    assert raw["sources"] == ["raw"]
    raw_30s = _versions(client, viewer_headers, "30s")
    assert raw_30s["sources"] == ["raw"]
    first, second = raw["points"]
    assert _latency(first) == (20, pytest.approx(80.0), pytest.approx(304.0), pytest.approx(316.8))
    assert (first["error_rate"], first["ttft_ms"], first["tokens_per_s"]) == (0.1, 40.0, 20.0)
    assert _latency(second)[:2] == (5, pytest.approx(120.0))

    with Session(engine) as session:
        run_rollup(session, KEEP_ALL)
    rolled = _versions(client, viewer_headers, "60")
    assert rolled["sources"] == ["rollup_60s", "raw"]  # raw: only windows received after the job ran
    assert [_latency(p) for p in rolled["points"]] == [_latency(p) for p in raw["points"]]

    hourly = _versions(client, viewer_headers, "1h")
    assert hourly["sources"] == ["rollup_3600s", "raw"]
    (hour,) = hourly["points"]
    assert _latency(hour)[:2] == (25, pytest.approx(120.0))  # rank 12.5 of [10, 5, 10]: half into (80, 160]

    fine = _versions(client, viewer_headers, "30s")  # whole 10-second rows per version
    assert fine["sources"] == ["rollup_10s", "raw"]
    assert [p["requests"] for p in fine["points"]] == [20, 0, 5, 0]
    assert [_latency(p) for p in fine["points"]] == [_latency(p) for p in raw_30s["points"]]
    odd = _versions(client, viewer_headers, "7s")  # no rollup divides it: raw windows only
    assert odd["sources"] == ["raw"] and sum(p["requests"] for p in odd["points"]) == 25


def test_device_history_and_query_errors(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    a, _ = _ingest_known(engine)
    response = client.get(f"/v1/telemetry/devices/{a}", params={"step": "60", **RANGE}, headers=viewer_headers)
    assert response.status_code == 200, response.text
    assert [p["requests"] for p in response.json()["points"]] == [10, 8]  # both versions unless narrowed
    narrowed = client.get(
        f"/v1/telemetry/devices/{a}", params={"step": "60", "version": "2", **RANGE}, headers=viewer_headers
    )
    assert [p["requests"] for p in narrowed.json()["points"]] == [0, 3]

    missing = client.get("/v1/telemetry/devices/nope", headers=viewer_headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "device_not_found")
    too_many = client.get(
        "/v1/telemetry/versions",
        params={
            "model": "tiny",
            "version": "1",
            "step": "1s",
            "start": T0.isoformat(),
            "end": (T0 + timedelta(days=1)).isoformat(),
        },
        headers=viewer_headers,
    )
    assert (too_many.status_code, too_many.json()["code"]) == (422, "too_many_points")
    bad_step = client.get(
        "/v1/telemetry/versions", params={"model": "tiny", "version": "1", "step": "soon"}, headers=viewer_headers
    )
    assert (bad_step.status_code, bad_step.json()["code"]) == (422, "validation_error")


def _registry_rows(session: Session) -> tuple[Model, ModelVersion]:
    model = Model(name="tiny")
    version = ModelVersion(model_id=model.id, version="2")
    session.add_all([model, version])
    session.flush()
    return model, version


def _fleet(engine: sa.Engine) -> dict[str, str]:
    ids = dict(
        zip(["on-1", "failing", "away", "odd"], add_devices(engine, "on-1", "failing", "away", "odd"), strict=True)
    )
    add_devices(engine, "gone", status=DeviceStatus.decommissioned)
    with Session(engine) as session:
        for name, device_id in ids.items():
            device = session.get(Device, device_id)
            assert device is not None
            device.current_model, device.current_version, device.current_sha256 = "tiny", "1", "a" * 64
            if name == "away":
                device.status = DeviceStatus.offline
            if name == "failing":
                device.phase, device.phase_reason, device.acked_message_id = (
                    "activation_failed",
                    "smoke test failed",
                    "m-f",
                )
            session.add(device)
        model, version = _registry_rows(session)
        old = Rollout(model_id=model.id, version_id=version.id, created_at=T0)
        new = Rollout(model_id=model.id, version_id=version.id, created_at=T0 + timedelta(hours=1))
        session.add_all([old, new])
        session.flush()
        session.add_all(
            [
                RolloutDevice(rollout_id=old.id, device_id=ids["on-1"], order_key="1", status="incompatible"),
                RolloutDevice(rollout_id=new.id, device_id=ids["on-1"], order_key="1", status="active"),
                RolloutDevice(
                    rollout_id=new.id,
                    device_id=ids["odd"],
                    order_key="2",
                    status="incompatible",
                    reason="no variant fits 512 MB",
                ),
            ]
        )
        for name, message_id, sha in (
            ("on-1", "m-1", "a" * 64),
            ("failing", "m-f", "b" * 64),
            ("away", "m-a", "b" * 64),
        ):
            session.add(
                DesiredStateRow(
                    device_id=ids[name],
                    message_id=message_id,
                    model="tiny",
                    version="2" if sha == "b" * 64 else "1",
                    artifact_sha256=sha,
                    rollout_id=new.id,
                    published_message_id=message_id,
                )
            )
        for minute, result, p95 in ((0, "inconclusive", None), (1, "pass", 50.0), (2, "fail", 250.0)):
            details = {
                "checks": [{"gate": "max_p95_latency_ms", "result": result, "value": p95, "limit": 200.0}],
                "new": {"version": "2", "requests": 40, "errors": 4, "p95_ms": p95, "max_rss_mb": 90.0, "devices": 1},
                "baseline": {"version": "1", "requests": 100, "p95_ms": 45.0, "devices": 2},
            }
            session.add(
                GateEvaluation(
                    rollout_id=new.id,
                    stage_index=0,
                    result=result,
                    details=details,
                    created_at=T0 + timedelta(minutes=minute),
                )
            )
        session.commit()
        ids["rollout"] = new.id
    return ids


def test_fleet_summary_counts_and_reasons(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    ids = _fleet(engine)
    response = client.get("/v1/telemetry/summary", headers=viewer_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["devices"] == 4
    assert body["by_status"] == {"online": 3, "offline": 1, "decommissioned": 1}
    assert body["by_version"] == [{"model": "tiny", "version": "1", "devices": 4, "online": 3}]
    assert [d["name"] for d in body["offline"]["devices"]] == ["away"]
    assert body["incompatible"]["count"] == 1  # on-1 was incompatible once, but its latest rollout took it
    assert body["incompatible"]["devices"][0]["device_id"] == ids["odd"]
    assert body["incompatible"]["devices"][0]["reason"] == "no variant fits 512 MB"
    drift = {d["name"]: d["reason"] for d in body["not_on_desired"]["devices"]}
    assert body["not_on_desired"]["count"] == 2
    assert drift == {"away": "device is offline", "failing": "activation_failed: smoke test failed"}
    assert body["rollouts_by_state"] == {"running": 2}

    limited = client.get("/v1/telemetry/summary", params={"limit": 1}, headers=viewer_headers).json()
    assert (limited["not_on_desired"]["count"], len(limited["not_on_desired"]["devices"])) == (2, 1)


def test_rollout_progress_pages_gate_evaluations_oldest_first(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    ids = _fleet(engine)
    url = f"/v1/telemetry/rollouts/{ids['rollout']}"
    first = client.get(url, params={"limit": 2}, headers=viewer_headers).json()
    assert first["devices"] == {"active": 1, "incompatible": 1}
    assert [p["result"] for p in first["points"]] == ["inconclusive", "pass"]
    assert first["points"][1]["gates"]["max_p95_latency_ms"] == {"value": 50.0, "limit": 200.0, "result": "pass"}
    assert (first["points"][1]["error_rate"], first["points"][1]["baseline_p95_ms"]) == (0.1, 45.0)
    rest = client.get(url, params={"limit": 2, "cursor": first["next_cursor"]}, headers=viewer_headers).json()
    assert [(p["result"], p["p95_ms"]) for p in rest["points"]] == [("fail", 250.0)]
    assert rest["next_cursor"] is None
    missing = client.get("/v1/telemetry/rollouts/nope", headers=viewer_headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "rollout_not_found")


@pytest.mark.parametrize("path", ["/v1/telemetry/summary", "/v1/telemetry/versions?model=tiny&version=1"])
def test_telemetry_needs_the_viewer_role(client, admin_headers, path: str) -> None:  # type: ignore[no-untyped-def]
    anonymous = client.get(path)
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthenticated")
    (device,) = enroll_devices(client, admin_headers, [("edge-1", {})])
    basic = base64.b64encode(f"{device['device_id']}:{device['device_secret']}".encode()).decode()
    as_device = client.get(path, headers={"Authorization": f"Basic {basic}"})
    assert (as_device.status_code, as_device.json()["code"]) == (403, "forbidden")


def test_newest_windows_come_from_raw_rows_without_double_counting(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    (a,) = add_devices(engine, "dev-a")
    now = datetime.now(UTC)
    ingest(engine, [window(a, now - timedelta(minutes=2), {3: 10})])
    with Session(engine) as session:
        run_rollup(session, KEEP_ALL)
    ingest(engine, [window(a, datetime.now(UTC), {4: 4})])  # after the job's watermark
    params = {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(minutes=1)).isoformat()}

    for step in ("1h", "5m", "60"):
        body = _versions(client, viewer_headers, step, **params)
        assert body["sources"][-1] == "raw" and body["sources"][0].startswith("rollup_"), body["sources"]
        assert sum(p["requests"] for p in body["points"]) == 14, step
    with Session(engine) as session:
        run_rollup(session, KEEP_ALL)
    assert sum(p["requests"] for p in _versions(client, viewer_headers, "1h", **params)["points"]) == 14
