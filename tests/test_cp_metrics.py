"""`GET /metrics`: Prometheus text with the fleet's numbers, HTTP request metrics and ingest counters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, SQLModel, select

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import DeviceStatus, GateEvaluation, Model, ModelVersion, Role, Rollout
from control_plane.telemetry.tables import VersionRollup
from shared.mqtt.client import MqttClient
from shared.state import ModelRef
from shared.topics import Topics
from tests.conftest import _token
from tests.support.fleet import enroll_devices
from tests.support.simulated import SimDevice, sim_config
from tests.support.telemetry import add_devices, ingest, window
from tests.support.waiting import wait_for

MOSQUITTO = "mqtt://127.0.0.1:1883"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _rollout_with_evaluations(engine: sa.Engine, results: list[str]) -> None:
    with Session(engine) as session:
        model = Model(name="tiny")
        version = ModelVersion(model_id=model.id, version="1")
        rollout = Rollout(model_id=model.id, version_id=version.id, state="completed")
        session.add_all([model, version])
        session.flush()
        session.add(rollout)
        session.flush()
        session.add_all(GateEvaluation(rollout_id=rollout.id, stage_index=0, result=r) for r in results)
        session.commit()


def test_metrics_report_the_fleet_http_requests_and_ingest_lag(client, engine, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    online = add_devices(engine, "a", "b")
    add_devices(engine, "c", status=DeviceStatus.offline)
    _rollout_with_evaluations(engine, ["pass", "pass", "fail"])
    before = scrape(client)
    assert client.get("/v1/telemetry/summary", headers=viewer_headers).status_code == 200
    assert client.get("/no/such/path").status_code == 404
    ingest(engine, [window(online[0], datetime.now(UTC) - timedelta(seconds=5), {3: 4})])

    after = scrape(client)
    assert value(after, "slmops_devices_online") == 2
    assert value(after, "slmops_devices", status="offline") == 1
    assert value(after, "slmops_rollouts", state="completed") == 1
    assert value(after, "slmops_gate_evaluations_total", result="pass") == 2
    assert value(after, "slmops_gate_evaluations_total", result="fail") == 1
    summary = {"method": "GET", "route": "/v1/telemetry/summary", "status": "200"}
    assert (
        value(after, "slmops_http_requests_total", **summary) - value(before, "slmops_http_requests_total", **summary)
        == 1
    )
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert (
        value(after, "slmops_http_requests_total", **unmatched)
        - value(before, "slmops_http_requests_total", **unmatched)
        == 1
    )
    timed = {"method": "GET", "route": "/v1/telemetry/summary"}
    assert value(after, "slmops_http_request_duration_seconds_count", **timed) >= 1
    lag_count = value(after, "slmops_ingest_lag_seconds_count") - value(before, "slmops_ingest_lag_seconds_count")
    lag_sum = value(after, "slmops_ingest_lag_seconds_sum") - value(before, "slmops_ingest_lag_seconds_sum")
    assert lag_count == 1
    assert 5 <= lag_sum < 600  # the window ended 5 s before it was written
    # fleet runtime disabled: the ingest counters are present and zero
    assert value(after, "slmops_ingest_messages_total", kind="telemetry") == 0


@pytest.fixture
def fleet(tmp_path, db_url, engine) -> Iterator[tuple[TestClient, Settings]]:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=0.1,
        telemetry_rollup_interval_s=0.2,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client, settings
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def _start_serving(settings: Settings, creds: list[dict]) -> list[SimDevice]:  # type: ignore[type-arg]
    topics = Topics(settings.mqtt_topic_prefix)
    serving = ModelRef(model="tiny", version="1", sha256="a" * 64, format="gguf")
    devices = [SimDevice(MOSQUITTO, topics, c["device_id"], c["device_secret"], sim_config()) for c in creds]
    for device in devices:
        device.state = device.state.model_copy(update={"current": serving})  # already serving v1
        device.start()
    return devices


def _rolled_up_requests(engine: sa.Engine) -> int:
    with Session(engine) as session:
        rows = session.exec(select(VersionRollup).where(VersionRollup.version == "1", VersionRollup.resolution_s == 60))
        return sum(r.requests for r in rows)


@pytest.mark.mosquitto
def test_metrics_count_real_mqtt_messages_and_the_rollup_job_runs(fleet, engine) -> None:  # type: ignore[no-untyped-def]
    client, settings = fleet
    admin = {"Authorization": f"Bearer {_token(engine, Role.admin)}"}
    creds = enroll_devices(client, admin, [("sim-1", {}), ("sim-2", {})])
    devices = _start_serving(settings, creds)
    stray = MqttClient(MOSQUITTO, client_id=f"stray-{uuid.uuid4().hex[:6]}")
    try:
        for device in devices:
            for _ in range(3):
                assert device.publish_telemetry()
        stray.start(wait=True, timeout_s=15)
        stray.publish(Topics(settings.mqtt_topic_prefix).telemetry(creds[0]["device_id"]), b"{not json")

        def counted() -> Samples | None:
            s = scrape(client)
            rejected = sum(v for (name, _), v in s.items() if name == "slmops_ingest_rejected_total")
            windows = value(s, "slmops_ingest_messages_total", kind="telemetry")
            done = windows >= 6 and rejected >= 1 and value(s, "slmops_devices_online") == 2
            return s if done else None

        samples = wait_for(counted, what="both devices online, six windows ingested, one malformed message rejected")
        assert value(samples, "slmops_ingest_messages_total", kind="telemetry") == 6
        assert value(samples, "slmops_ingest_rejected_total", reason="malformed_json") == 1
        assert value(samples, "slmops_ingest_rejected_total", reason="handler_failed") == 0
        client.app.state.fleet.subscriber.counters.lost += 3  # as the writer counts what it could not store
        assert value(scrape(client), "slmops_ingest_rejected_total", reason="handler_failed") == 3
        assert value(samples, "slmops_mqtt_messages_received_total") >= 7
        assert value(samples, "slmops_ingest_lag_seconds_count") >= 6
        expected = 6 * sim_config().requests_per_window
        wait_for(lambda: _rolled_up_requests(engine) == expected, what="the rollup job to roll up every window")
    finally:
        stray.stop()
        for device in devices:
            device.stop()
