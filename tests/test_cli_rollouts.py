"""`slmops rollout ...` and `slmops telemetry ...` against a real control plane, with and without a fleet."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.api.main import create_app
from control_plane.config import Settings
from shared.topics import Topics
from tests.support.cli import (  # noqa: F401  (fixtures)
    Cli,
    FlakyLink,
    admin_cli_fixture,
    bearer,
    cli_fixture,
    enroll,
    enrolled_device,
    one_line,
    serve,
    server_url_fixture,
)
from tests.support.simulated import TelemetryPump, sim_config, start_sim_devices
from tests.support.waiting import wait_for

MOSQUITTO = "mqtt://127.0.0.1:1883"


def test_rollout_lifecycle(cli: Cli, admin_cli: Cli, tiny_gguf: Path, tmp_path: Path) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    enrolled_device(admin_cli, "edge-1", ["region=eu"])
    enrolled_device(admin_cli, "edge-2", ["region=us"])
    rollout = cli.json(
        "rollout", "create", "tiny", "1", "--selector", "region=eu", "--stage", "canary:1:0",
        "--stage", "fleet:100%:30", "--manual", "--max-p95-ratio", "1.2", "--min-samples", "5",
    )  # fmt: skip
    assert rollout["state"] == "running" and rollout["promotion"] == "manual"
    assert [(s["name"], s["count"], s["percent"], s["min_bake_s"]) for s in rollout["stages"]] == [
        ("canary", 1, None, 0),
        ("fleet", None, 100, 30),
    ]
    status = cli.json("rollout", "status", rollout["id"])
    assert sum(status["devices"].values()) == 1  # only the region=eu device is a target
    view = one_line(cli("rollout", "status", rollout["id"]).stdout)
    assert "tiny@1" in view and "1/2 canary" in view and "0/2 stages done" in view

    assert cli.json("rollout", "pause", rollout["id"])["state"] == "paused"
    twice = one_line(cli("rollout", "pause", rollout["id"], code=1).stderr)
    assert "invalid_state" in twice and "resume on paused ones" in twice
    assert cli.json("rollout", "resume", rollout["id"])["state"] == "running"
    assert cli.json("rollout", "promote", rollout["id"])["stage"] == "fleet"
    assert cli("rollout", "abort", rollout["id"]).stdout.startswith(f"rollout {rollout['id']}: aborted")
    assert [r["state"] for r in cli.json("rollout", "list")] == ["aborted"]
    finished = cli("rollout", "status", rollout["id"], "--watch", code=3)  # aborted: not completed
    assert "aborted" in finished.stdout

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": {}}))
    again = cli.json("rollout", "create", "tiny", "1", "--plan", str(plan), "--max-error-rate", "0.01")
    assert [s["name"] for s in again["stages"]] == ["all"] and again["promotion"] == "auto"
    assert sum(again["devices"].values()) == 2


def test_watch_waits_out_an_unreachable_control_plane(
    cli: Cli, admin_cli: Cli, server_url: str, operator_headers: dict[str, str], tiny_gguf: Path
) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    enrolled_device(admin_cli, "edge-1", [])
    rollout_id = cli.json("rollout", "create", "tiny", "1")["id"]
    link = FlakyLink(server_url)

    def outage_then_abort() -> None:
        # Without a fleet runtime nothing advances the rollout: the link fails while we watch, then an
        # operator aborts it and the link comes back.
        try:
            # A second request means the first was answered: the watch loop runs (a failure at the very
            # start is reported at once, as a wrong --server should be).
            wait_for(lambda: link.requests >= 2, what="the watch polling through the link")
            link.go_down()
            wait_for(lambda: link.refused >= 2, what="the watch retrying during the outage")
        finally:
            httpx.post(f"{server_url}/v1/rollouts/{rollout_id}/abort", headers=operator_headers).raise_for_status()
            link.go_up()

    operator = threading.Thread(target=outage_then_abort)
    operator.start()
    try:
        watched = cli("rollout", "status", rollout_id, "--watch", "--interval", "0.05", "-o", "json", code=3,
                      SLMOPS_SERVER=link.url)  # fmt: skip
    finally:
        operator.join()
        link.close()
    assert json.loads(watched.stdout)["state"] == "aborted"
    assert link.refused >= 2  # it kept trying instead of giving up with an error


@pytest.fixture
def fleet_url(tmp_path: Path, db_url: str, engine: Any, app: Any) -> Iterator[tuple[str, Settings]]:
    """A control plane with its fleet runtime (controller, MQTT ingest) on the real Mosquitto."""
    settings = Settings(
        data_dir=tmp_path / "fleet",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=0.1,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    with serve(create_app(settings, engine=engine)) as url:
        yield url, settings  # the `app` fixture empties the tables afterwards


@pytest.mark.mosquitto
def test_watch_a_real_rollout_complete_then_roll_back(
    fleet_url: tuple[str, Settings],
    operator_headers: dict[str, str],
    admin_headers: dict[str, str],
    tiny_gguf: Path,
    tiny_gguf_other: Path,
    tmp_path: Path,
) -> None:
    url, settings = fleet_url
    cli, admin_cli = Cli(url, bearer(operator_headers), tmp_path), Cli(url, bearer(admin_headers), tmp_path)
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    cli("model", "push", "tiny", "2", str(tiny_gguf_other))
    creds = [enroll(admin_cli, f"edge-{i}", ["region=eu"]) for i in range(2)]
    behaviour = sim_config(latency_ms=lambda v: {"1": 40.0, "2": 200.0}[v], requests_per_window=10)
    devices = start_sim_devices(MOSQUITTO, Topics(settings.mqtt_topic_prefix), creds, behaviour)
    fast = ["--stage", "canary:1:0.3", "--stage", "fleet:100%:0.3", "--min-samples", "10"]
    try:
        with TelemetryPump(devices):
            wait_for(lambda: len(cli.json("device", "list", "--status", "online")) == 2, what="devices online")
            first = cli.json("rollout", "create", "tiny", "1", *fast, "--manual")
            waiting = wait_for(
                lambda: cli.json("rollout", "status", first["id"])["state"] == "waiting_promotion",
                what="the canary's gates to pass",
            )
            assert waiting and "gates passed: promote with" in one_line(cli("rollout", "status", first["id"]).stdout)
            assert cli.json("rollout", "promote", first["id"])["stage"] == "fleet"
            done = one_line(cli("rollout", "status", first["id"], "--watch", "--interval", "0.2").stdout)
            assert "completed" in done and "2/2 stages done" in done and "min_activated_fraction pass" in done

            second = cli.json("rollout", "create", "tiny", "2", *fast, "--max-p95-ratio", "1.5")
            failed = cli("rollout", "status", second["id"], "--watch", "--interval", "0.2", code=3)
            view = one_line(failed.stdout)
            assert "rolled_back" in view and "last gate evaluation: fail" in view
            assert "max_p95_latency_ratio fail" in view  # the check that decided it, with value and limit
            # The rolled-back canary returns to v1 (stopping a simulated device mid-apply races its timer).
            wait_for(lambda: {d.current_version for d in devices} == {"1"}, what="devices back on v1")
            wait_for(lambda: _running(cli) == [("tiny", "1", 2)], what="the control plane sees both on v1")
            _fleet_telemetry_shows_the_rollback(cli, creds[0]["device_id"])
    finally:
        for device in devices:
            device.stop()
    final = cli.json("rollout", "status", second["id"])
    ratio = next(c for c in final["last_evaluation"]["details"]["checks"] if c["gate"] == "max_p95_latency_ratio")
    assert ratio["result"] == "fail" and ratio["limit"] == 1.5
    history = cli.json("rollout", "evaluations", second["id"])
    assert history[0]["result"] == "fail" and history[0] == final["last_evaluation"]  # newest first
    table = one_line(cli("rollout", "evaluations", second["id"]).stdout)
    assert f"max_p95_latency_ratio {ratio['value']:g} / 1.5" in table


def _fleet_telemetry_shows_the_rollback(cli: Cli, device_id: str) -> None:
    summary = cli.json("telemetry", "summary")
    assert summary["devices"] == 2 and summary["online"] == 2
    assert "2 devices (online 2)" in one_line(cli("telemetry", "summary").stdout)
    v2 = cli.json("telemetry", "version", "tiny", "2", "--since", "10m", "--step", "1m")
    served = [p for p in v2["points"] if p["requests"]]
    assert served and all(p["latency_p95_ms"] > 100 for p in served)  # the canary's slow version (200 ms)
    table = one_line(cli("telemetry", "version", "tiny", "1", "--since", "10m", "--step", "1m").stdout)
    assert "tiny@1, every 60s" in table and "p95 ms" in table
    device = cli.json("telemetry", "device", device_id, "--since", "10m", "--step", "1m")
    assert device["device_id"] == device_id and any(p["requests"] for p in device["points"])


def _running(cli: Cli) -> list[tuple[str, str, int]]:
    return [(v["model"], v["version"], v["devices"]) for v in cli.json("telemetry", "summary")["by_version"]]
