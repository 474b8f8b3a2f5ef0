"""Real agent processes over the real Mosquitto: an agent offline during a rollout converges when it
returns, and a control plane killed with SIGKILL mid-rollout carries on after a restart."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.demo import register_models, start_agents, start_control_plane, wait_until
from tests.support.fleet import mosquitto_fleet

PLAN: dict[str, Any] = {
    "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
    # Every device must run the version: an offline one keeps the gate inconclusive (waiting).
    "gates": {"min_activated_fraction": 1.0, "max_p95_latency_ratio": None, "max_error_rate": None},
}


def _devices(api: httpx.Client) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in api.get("/v1/devices", params={"limit": 100}).json()["data"]}


def _rollout(api: httpx.Client, rollout_id: str) -> dict[str, Any]:
    return api.get(f"/v1/rollouts/{rollout_id}").json()  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.mosquitto
def test_offline_agent_converges_and_a_killed_control_plane_carries_on(tmp_path: Path) -> None:
    fleet = mosquitto_fleet(tmp_path / "fleet")
    try:
        api = start_control_plane(fleet)
        register_models(fleet, api)
        names = start_agents(fleet, api, 2)
        agents = dict(zip(names, fleet.procs[1:], strict=True))
        first = api.post("/v1/rollouts", json={"model": "tinyllama", "version": "1.0.0", **PLAN}).json()
        wait_until(lambda: _rollout(api, first["id"])["state"] == "completed", 120, "1.0.0 on both agents")

        # The second agent stops (a clean stop: it says offline) before the next rollout starts.
        late = agents[names[1]]
        late.send_signal(signal.SIGTERM)
        late.wait(timeout=30)
        wait_until(lambda: _devices(api)[names[1]]["status"] == "offline", 30, "agent offline")
        second = api.post("/v1/rollouts", json={"model": "tinyllama", "version": "2.0.0", **PLAN}).json()
        wait_until(lambda: _devices(api)[names[0]]["current_version"] == "2.0.0", 120, "online agent on 2.0.0")

        # SIGKILL the control plane mid-rollout; the rollout lives in SQL and resumes on restart.
        server = fleet.procs[0]
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        fleet.procs.remove(server)
        fleet.spawn(["server"], "control-plane.log")
        wait_until(lambda: httpx.get(f"{fleet.base}/readyz", timeout=2).status_code == 200, 60, "restart")
        held = wait_until(lambda: _rollout(api, second["id"]).get("last_evaluation") and _rollout(api, second["id"]),
                          30, "an evaluation after the restart")  # fmt: skip
        assert held["state"] == "running", "the offline agent holds the rollout: waiting, not failed"
        assert held["devices"] == {"active": 1, "assigned": 1}, held["devices"]
        assert _devices(api)[names[1]]["current_version"] == "1.0.0"

        # The agent returns: its retained desired state reaches it, it downloads, verifies and swaps.
        config = fleet.workdir / "agents" / names[1] / "agent.toml"
        fleet.spawn(["agent", "--config", str(config)], f"{names[1]}.log")
        done = wait_until(
            lambda: (r := _rollout(api, second["id"]))["state"] != "running" and r, 120, "rollout after return"
        )
        assert done["state"] == "completed", done
        devices = _devices(api)
        assert {d["current_version"] for d in devices.values()} == {"2.0.0"}
        assert {d["status"] for d in devices.values()} == {"online"}
        # The restarted agent reused its credential (one enrollment) and serves 2.0.0 on its local API.
        port = fleet.agent_ports[1]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        assert any("2.0.0" in (m.get("version") or m["id"]) for m in models), models
    finally:
        fleet.shutdown()
