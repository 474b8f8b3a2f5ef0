"""A rollout over a three-node NATS cluster survives kill -9 of a node mid-stage.

Real processes throughout: three `nats-server` nodes (JetStream, MQTT), the control plane
(`slmops server`, keeping the NATS users file), two real agents and a simulated fleet
(`slmops simulate`), spread over the nodes by client id. The node one real agent is on is killed
while the first stage runs; the cluster re-elects its JetStream leaders (10-15 s), every client
on that node moves to another, and the rollout still completes with every device on the new
version and its telemetry stored.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from slmops.demo import Fleet, register_models, start_agents, start_control_plane, wait_until
from tests.support.mqtt import unique_topics
from tests.support.nats import NatsCluster, nats_available

SIMULATED = 24
PLAN: dict[str, Any] = {
    "stages": [
        {"name": "half", "percent": 50, "min_bake_s": 5},
        {"name": "all", "percent": 100, "min_bake_s": 0},
    ],
    "gates": {"min_activated_fraction": 1.0, "max_p95_latency_ratio": None, "max_error_rate": None},
}


@dataclass
class NatsFleet(Fleet):
    """The demo fleet with its control plane on a NATS cluster, keeping the cluster's users file."""

    cluster_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return super().env() | self.cluster_env


def _devices(api: httpx.Client) -> list[dict[str, Any]]:
    return api.get("/v1/devices", params={"limit": 500}).json()["data"]  # type: ignore[no-any-return]


def _telemetry(db: Path) -> dict[str, list[tuple[int, float]]]:
    """device id -> (seq, window_end as epoch seconds) of every stored window."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT device_id, seq, window_end FROM telemetry_windows").fetchall()
    stored: dict[str, list[tuple[int, float]]] = {}
    for device_id, seq, window_end in rows:
        ended = time.mktime(time.strptime(str(window_end)[:19], "%Y-%m-%d %H:%M:%S")) - time.timezone
        stored.setdefault(device_id, []).append((int(seq), ended))
    return stored


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.skipif(not nats_available(), reason="nats-server is not installed")
def test_rollout_completes_while_a_nats_node_is_killed(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "nats", topics=unique_topics())
    cluster.start()
    fleet = NatsFleet(
        workdir=tmp_path / "fleet",
        console=Console(quiet=True),
        mqtt_url=cluster.admin_urls,
        topic_prefix=cluster.topics.prefix,
        cluster_env={
            "SLMOPS_NATS_USERS_FILE": str(cluster.users.path),
            "SLMOPS_NATS_PID_FILES": ",".join(str(cluster.pid_file(n)) for n in cluster.nodes),
            "SLMOPS_DEVICE_MQTT_URL": cluster.urls(),
        },
    )
    try:
        api = start_control_plane(fleet)
        register_models(fleet, api)
        names = start_agents(fleet, api, 2)
        fleet.spawn(
            ["simulate", "-n", str(SIMULATED), "--control-plane", fleet.base, "--token", fleet.token,
             "--name-prefix", "sim", "--apply-delay", "1", "--telemetry-interval", "1"],
            "simulate.log",
        )  # fmt: skip
        total = len(names) + SIMULATED
        wait_until(lambda: sum(d["status"] == "online" for d in _devices(api)) == total, 90, "every device online")
        assert all(count > 0 for count in cluster.connection_counts()), "clients spread over every node"

        agent_id = next(d["id"] for d in _devices(api) if d["name"] == names[0])
        victim = cluster.node_of(agent_id)
        assert victim is not None, "the real agent is connected to a node"
        rollout = api.post("/v1/rollouts", json={"model": "tinyllama", "version": "1.0.0", **PLAN}).json()
        wait_until(
            lambda: (
                (r := api.get(f"/v1/rollouts/{rollout['id']}").json())["stage_index"] == 0
                and r["devices"].get("active", 0) >= 1
            ),
            90,
            "the first stage under way",
        )
        cluster.kill(victim)
        killed_at = time.time()

        done = wait_until(
            lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}").json())["state"] != "running" and r,
            100,
            "the rollout after the node died",
        )
        assert done["state"] == "completed", done
        devices = _devices(api)
        assert {d["current_version"] for d in devices} == {"1.0.0"}, devices
        assert cluster.node_of(agent_id) not in (None, victim), "the agent moved to a live node"

        # Telemetry sent after the node died is stored for every device; a real agent spools what it
        # could not send meanwhile, so its windows have no gap (seq counts windows since its start).
        db = fleet.workdir / "control-plane" / "slmops.db"
        ids = {d["id"]: d["name"] for d in devices}
        stored = wait_until(
            lambda: (s := _telemetry(db)) and all(any(end > killed_at for _, end in s.get(i, [])) for i in ids) and s,
            60,
            "telemetry from every device after the kill",
        )
        for device_id, name in ids.items():
            if name in names:
                seqs = sorted({seq for seq, _ in stored[device_id]})
                assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"{name} lost windows: {seqs}"
    finally:
        fleet.shutdown()
        cluster.stop()
