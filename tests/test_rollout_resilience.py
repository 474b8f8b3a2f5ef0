"""Rollouts survive a killed control plane, wait for offline devices, and shrug off bad payloads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.publish as mqtt_publish
import pytest
from sqlmodel import SQLModel

from shared.net import free_port
from shared.topics import Topics
from tests.support.simulated import TelemetryPump, sim_config, start_sim_devices
from tests.support.waiting import wait_for
from tests.test_rollouts import MOSQUITTO, fleet  # noqa: F401  (fixture)

PLAN = {
    "stages": [
        {"name": "canary", "count": 1, "min_bake_s": 1.5},
        {"name": "fleet", "percent": 100, "min_bake_s": 0.5},
    ],
    "gates": {"min_samples": 10, "max_p95_latency_ratio": 1.5},
}


class ServerProcess:
    """`slmops server` as a real process that the test can kill -9 and start again."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.port = int(env["SLMOPS_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmops", "server"],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout_s=60, what="server ready")

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.workdir / "server.log").read_text()
        try:
            return httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture
def server(tmp_path: Path, db_url: str, engine):  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env |= {
        "SLMOPS_PORT": str(free_port()),
        "SLMOPS_MQTT_URL": MOSQUITTO,
        "SLMOPS_DATABASE_URL": db_url,
        "SLMOPS_MQTT_TOPIC_PREFIX": f"slmops-test/{uuid.uuid4().hex[:10]}",
        "SLMOPS_CONTROLLER_TICK_S": "0.2",
        "SLMOPS_MQTT_CLIENT_ID": f"cp-{uuid.uuid4().hex[:8]}",
    }
    proc = ServerProcess(tmp_path, env)
    proc.start()
    yield proc
    proc.stop()
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def _cli_token(server: ServerProcess, role: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "slmops", "token", "create", "--role", role, "--name", role],
        cwd=server.workdir,
        env=server.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"Authorization": f"Bearer {out.stdout.strip()}"}


def _setup_fleet(
    api: httpx.Client, admin: dict[str, str], op: dict[str, str], models: list[Path], n: int
) -> list[dict]:  # type: ignore[type-arg]
    assert api.post("/v1/models", json={"name": "tiny"}, headers=op).status_code == 201
    for i, path in enumerate(models, start=1):
        with path.open("rb") as fh:
            r = api.post("/v1/models/tiny/versions", data={"version": str(i)}, files={"file": fh}, headers=op)
        assert r.status_code == 201, r.text
    creds = []
    for i in range(n):
        token = api.post("/v1/devices", json={"name": f"d{i}"}, headers=admin).json()["enrollment_token"]
        creds.append(api.post("/v1/devices/enroll", json={"enrollment_token": token}).json())
    return creds


def _state(api: httpx.Client, op: dict[str, str], rollout_id: str) -> str:
    return str(api.get(f"/v1/rollouts/{rollout_id}", headers=op).json()["state"])


@pytest.mark.mosquitto
def test_kill9_control_plane_mid_rollout_then_restart_continues(server, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    api = httpx.Client(base_url=server.base, timeout=10)
    admin, op = _cli_token(server, "admin"), _cli_token(server, "operator")
    creds = _setup_fleet(api, admin, op, [tiny_gguf, tiny_gguf_other], 3)
    topics = Topics(server.env["SLMOPS_MQTT_TOPIC_PREFIX"])
    devices = start_sim_devices(MOSQUITTO, topics, creds, sim_config(requests_per_window=10))
    try:
        with TelemetryPump(devices):
            first = api.post("/v1/rollouts", json={"model": "tiny", "version": "1", **PLAN}, headers=op).json()
            wait_for(lambda: _state(api, op, first["id"]) == "completed", timeout_s=60, what="v1 rollout")
            second = api.post("/v1/rollouts", json={"model": "tiny", "version": "2", **PLAN}, headers=op).json()
            wait_for(lambda: sum(d.current_version == "2" for d in devices) == 1, what="canary on v2")
            server.kill9()  # mid-rollout: canary on v2, the rest still on v1
            applied_before = {d.device_id: len(d.applied) for d in devices}
            server.start()
            wait_for(lambda: _state(api, op, second["id"]) == "completed", timeout_s=60, what="v2 after restart")
            assert {d.current_version for d in devices} == {"2"}
            # No conflicting desired states: each device moved to v2 at most once more, never back.
            for device in devices:
                assert len(device.applied) - applied_before[device.device_id] <= 1
            evaluations = api.get(f"/v1/rollouts/{second['id']}/evaluations", headers=op).json()
            assert any(e["result"] == "pass" for e in evaluations)
    finally:
        for device in devices:
            device.stop()


@pytest.mark.mosquitto
def test_offline_device_holds_the_stage_then_converges(fleet, engine, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]  # noqa: F811
    client, settings = fleet
    from tests.test_rollouts import _token

    admin, op = _token(engine, "admin"), _token(engine, "operator")
    api = client
    creds = _setup_fleet(api, admin, op, [tiny_gguf, tiny_gguf_other], 3)  # type: ignore[arg-type]
    topics = Topics(settings.mqtt_topic_prefix)
    devices = start_sim_devices(MOSQUITTO, topics, creds, sim_config(requests_per_window=10))
    try:
        with TelemetryPump(devices):
            first = api.post("/v1/rollouts", json={"model": "tiny", "version": "1", **PLAN}, headers=op).json()
            wait_for(lambda: _state(api, op, first["id"]) == "completed", timeout_s=60, what="v1 rollout")
            devices[2].stop()  # goes offline (last will) before the next rollout reaches it
            second = api.post("/v1/rollouts", json={"model": "tiny", "version": "2", **PLAN}, headers=op).json()
            # Whether or not the offline device is the canary, the rollout cannot finish without it.
            wait_for(
                lambda: (
                    any(d.current_version == "2" for d in devices[:2])
                    or api.get(f"/v1/rollouts/{second['id']}", headers=op).json()["last_evaluation"]
                ),
                what="progress",
            )
            time.sleep(2.5)  # longer than both bake times: a rollout that ignored the device would be done
            held = api.get(f"/v1/rollouts/{second['id']}", headers=op).json()
            assert held["state"] == "running", "an offline device makes the gate wait, not fail"
            assert held["last_evaluation"]["result"] == "inconclusive"
            assert devices[2].current_version == "1"
            devices[2] = start_sim_devices(MOSQUITTO, topics, [creds[2]], sim_config(requests_per_window=10))[0]
            wait_for(lambda: _state(api, op, second["id"]) == "completed", timeout_s=60, what="converged")
            assert {d.current_version for d in devices} == {"2"}  # retained desired state reached it on reconnect
    finally:
        for device in devices:
            device.stop()


@pytest.mark.mosquitto
def test_malformed_payloads_do_not_stop_ingestion(fleet, engine, tiny_gguf):  # type: ignore[no-untyped-def]  # noqa: F811
    client, settings = fleet
    from tests.test_rollouts import _token

    admin, op = _token(engine, "admin"), _token(engine, "operator")
    creds = _setup_fleet(client, admin, op, [tiny_gguf], 1)  # type: ignore[arg-type]
    topics = Topics(settings.mqtt_topic_prefix)
    device_id = creds[0]["device_id"]
    host, port = "127.0.0.1", 1883
    for topic, payload in [
        (topics.state(device_id), b"{not json"),
        (topics.telemetry(device_id), b'{"seq": "x"}'),
        (topics.status(device_id), b'{"schema_version": 999, "status": "online"}'),
        (f"{topics.prefix}/devices/{device_id}/unknown-kind", b"{}"),
        (topics.status(device_id), b"\xff\xfe"),
    ]:
        mqtt_publish.single(topic, payload, qos=1, hostname=host, port=port)
    devices = start_sim_devices(MOSQUITTO, topics, creds, sim_config())
    try:
        wait_for(
            lambda: client.get(f"/v1/devices/{device_id}", headers=op).json()["status"] == "online",
            what="the valid birth message still ingested",
        )
        runtime = client.app.state.fleet  # type: ignore[attr-defined]
        assert runtime.subscriber.counters.malformed_total >= 4
    finally:
        for device in devices:
            device.stop()
