"""`slmops demo`: a whole fleet on this machine, three rollouts, and what happened.

Starts the control plane (SQLite, embedded MQTT broker) and N real agent processes, makes three
tiny real GGUF models (v1 and v2 healthy, v3 deliberately slower), sends each agent a steady
trickle of local inference requests so it reports real latency, then rolls v1 out to everyone,
v2 canary -> fleet, and v3, whose latency gate fails so the fleet rolls back to v2 by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from shared.net import free_port
from slmops.demo_trust import report_verifications
from slmops.errors import SlmopsError
from slmops.tinymodels.gguf_tiny import write_tiny_gguf

REGIONS = ("eu", "us")
SLOW_LAYERS = 24  # v3: twelve times the tiny model's two layers
MAX_TOKENS = 16
PLAN: dict[str, Any] = {
    "stages": [
        {"name": "canary", "count": 1, "min_bake_s": 4},
        {"name": "fleet", "percent": 100, "min_bake_s": 4},
    ],
    # 2.0, not 1.5: five agents share two cores here, so latency is noisy.
    "gates": {"min_samples": 30, "max_p95_latency_ratio": 2.0, "max_error_rate": 0.05},
}


# What `timeout`, systemd, container runtimes, Ctrl-C and a closed terminal send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class DemoStopped(SlmopsError):
    """A stop signal arrived: unwind so that every process the demo started is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_stopped(signum: int, _frame: object) -> None:
    # Later signals are ignored so that the first one's shutdown runs to its end.
    _ignore_stop_signals()
    raise DemoStopped(signum)


@contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise DemoStopped in the main thread for as long as this lasts."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Fleet:
    workdir: Path
    console: Console
    api_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent_ports: list[int] = field(default_factory=list)
    token: str = ""
    mqtt_url: str | None = None  # an external broker (e.g. Mosquitto) instead of the embedded one
    topic_prefix: str = "slmops/v1"
    stop_load: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        env |= {
            "SLMOPS_DATA_DIR": str(self.workdir / "control-plane"),
            "SLMOPS_PORT": str(self.api_port),
            "SLMOPS_MQTT_PORT": str(self.mqtt_port),
            "SLMOPS_CONTROLLER_TICK_S": "0.5",
            "SLMOPS_MQTT_TOPIC_PREFIX": self.topic_prefix,
        }
        if self.mqtt_url:
            env |= {"SLMOPS_MQTT_URL": self.mqtt_url, "SLMOPS_MQTT_CLIENT_ID": f"slmops-demo-{self.api_port}"}
        return env

    def spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / "logs" / log_name).open("ab")
        # Not by blocking the stop signals around Popen: the child would inherit the blocked mask
        # and never see the SIGTERM that stops it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "slmops", *args],
            env=env or self.env(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def shutdown(self) -> None:
        self.stop_load.set()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.console.log(f"killed {' '.join(map(str, proc.args[3:]))}: it did not stop on SIGTERM")  # type: ignore[index]
                proc.kill()


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def start_control_plane(fleet: Fleet) -> httpx.Client:
    (fleet.workdir / "logs").mkdir(parents=True, exist_ok=True)
    fleet.spawn(["server"], "control-plane.log")
    wait_until(lambda: httpx.get(f"{fleet.base}/readyz", timeout=2).status_code == 200, 60, "the control plane")
    out = subprocess.run(
        [sys.executable, "-m", "slmops", "token", "create", "--role", "admin", "--name", "demo"],
        env=fleet.env(),
        cwd=fleet.workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    fleet.token = out.stdout.strip()
    return httpx.Client(base_url=fleet.base, headers={"Authorization": f"Bearer {fleet.token}"}, timeout=30)


def register_models(fleet: Fleet, api: httpx.Client) -> None:
    models = fleet.workdir / "models"
    files = {
        "1.0.0": write_tiny_gguf(models / "v1.gguf", seed=1),
        "2.0.0": write_tiny_gguf(models / "v2.gguf", seed=2),
        "3.0.0": write_tiny_gguf(models / "v3-slow.gguf", seed=3, layers=SLOW_LAYERS),
    }
    api.post("/v1/models", json={"name": "tinyllama", "description": "demo model"}).raise_for_status()
    for version, path in files.items():
        with path.open("rb") as fh:
            api.post("/v1/models/tinyllama/versions", data={"version": version}, files={"file": fh}).raise_for_status()


def start_agents(fleet: Fleet, api: httpx.Client, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"kiosk-{i + 1:02d}"
        labels = {"region": REGIONS[i % len(REGIONS)], "tier": "canary" if i == 0 else "main"}
        created = api.post("/v1/devices", json={"name": name, "labels": labels})
        created.raise_for_status()
        port = free_port()
        data_dir = fleet.workdir / "agents" / name
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "agent.toml"
        config.write_text(
            f'control_plane_url = "{fleet.base}"\nenrollment_token = "{created.json()["enrollment_token"]}"\n'
            f'data_dir = "{data_dir}"\nlisten_port = {port}\nthreads = 1\ntelemetry_window_s = 1.0\n'
            "trial_requests = 3\ntrial_seconds = 3\nwatch_interval_s = 0.5\n"
        )
        fleet.spawn(["agent", "--config", str(config)], f"{name}.log")
        fleet.agent_ports.append(port)
        names.append(name)
    wait_until(lambda: _online_count(api) == count, 120, f"{count} agents online")
    return names


def _serving(api: httpx.Client, version: str) -> list[str]:
    devices = api.get("/v1/devices", params={"current_version": version, "limit": 500}).json()["data"]
    return [d["name"] for d in devices]


def _online_count(api: httpx.Client) -> int:
    return sum(d["status"] == "online" for d in api.get("/v1/devices", params={"limit": 500}).json()["data"])


def load_generator(fleet: Fleet, port: int) -> None:
    """A trickle of short completions on one agent's loopback API, as local apps would send."""
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    while not fleet.stop_load.is_set():
        try:
            response = client.post(
                "/v1/completions",
                json={"model": "tinyllama", "prompt": "Hello from the edge", "max_tokens": MAX_TOKENS},
            )
            if response.status_code >= 500:
                time.sleep(0.2)
        except httpx.TransportError:
            time.sleep(0.5)
        fleet.stop_load.wait(0.1)
    client.close()


def run_rollout(
    api: httpx.Client,
    console: Console,
    version: str,
    timeout_s: float = 150,
    *,
    model: str = "tinyllama",
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    created = api.post("/v1/rollouts", json={"model": model, "version": version, **(plan or PLAN)})
    created.raise_for_status()
    rollout_id = created.json()["id"]
    last = ""
    deadline = time.monotonic() + timeout_s
    with console.status(f"rolling out {version}") as status:
        while time.monotonic() < deadline:
            body = api.get(f"/v1/rollouts/{rollout_id}").json()
            devices = ", ".join(f"{k}={v}" for k, v in sorted(body["devices"].items()))
            line = f"{version}: {body['state']} | stage {body['stage']} | {devices}"
            if line != last:
                console.log(line)
                last = line
            status.update(line)
            if body["state"] in ("completed", "rolled_back", "aborted"):
                body["evaluations"] = api.get(f"/v1/rollouts/{rollout_id}/evaluations").json()
                if body["state"] != "completed":
                    status.update(f"{version}: waiting for every device to report its previous version again")
                    wait_until(lambda: not _serving(api, version), 60, f"devices to leave {version}")
                return body  # type: ignore[no-any-return]
            time.sleep(0.5)
    raise RuntimeError(f"rollout of {version} did not finish within {timeout_s}s")


def _decisive(evaluations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation that decided the rollout: the failing one, else the last passing one."""
    for result in ("fail", "pass"):
        for evaluation in evaluations:  # newest first
            if evaluation["result"] == result:
                return evaluation
    return None


def summarise(console: Console, results: list[dict[str, Any]], api: httpx.Client) -> bool:
    """Print what happened; whether every release was verified on every device it was sent to."""
    table = Table(title="slmops demo: what happened")
    for column in ("rollout", "result", "p95 new (ms)", "p95 baseline (ms)", "ratio gate", "why"):
        table.add_column(column)
    for body in results:
        decisive = _decisive(body["evaluations"]) or {"details": {}}
        details = decisive["details"]
        ratio = next((c for c in details.get("checks", []) if c["gate"] == "max_p95_latency_ratio"), None)
        new_p95 = (details.get("new") or {}).get("p95_ms")
        base_p95 = (details.get("baseline") or {}).get("p95_ms")
        table.add_row(
            f"{body['baseline_version'] or '-'} -> {body['version']}",
            body["state"],
            f"{new_p95:.1f}" if new_p95 else "-",
            f"{base_p95:.1f}" if base_p95 else "-",
            f"{ratio['value']} vs <= {ratio['limit']} ({ratio['result']})" if ratio else "n/a (first rollout)",
            body["reason"],
        )
    console.print(table)
    devices = api.get("/v1/devices", params={"limit": 500}).json()["data"]
    fleet_table = Table(title="devices now")
    for column in ("device", "labels", "status", "serving"):
        fleet_table.add_column(column)
    for d in sorted(devices, key=lambda d: d["name"]):
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        fleet_table.add_row(d["name"], labels, d["status"], f"{d['current_model']}@{d['current_version']}")
    console.print(fleet_table)
    return report_verifications(console, results, api)


def conclude(
    fleet: Fleet, console: Console, results: list[dict[str, Any]], started: float, keep: bool, *, verified: bool
) -> int:
    """Say whether v1, v2, v3 ended completed, completed, rolled back and every device verified
    each release it was sent (`verified`); with `keep`, wait for Ctrl-C."""
    expected = verified and [r["state"] for r in results] == ["completed", "completed", "rolled_back"]
    console.log(
        f"demo finished in {time.monotonic() - started:.0f}s: "
        + ("as expected" if expected else "[red]NOT as expected[/red]")
    )
    if keep:
        console.print(f"\nAPI: {fleet.base}/docs  dashboard: {fleet.base}/  token: {fleet.token}")
        console.print("agents: " + ", ".join(f"http://127.0.0.1:{p}/v1" for p in fleet.agent_ports))
        console.print("Ctrl-C stops everything.")
        while True:
            signal.pause()
    return 0 if expected else 1


def run_demo(
    workdir: Path,
    devices: int,
    keep: bool,
    console: Console,
    mqtt_url: str | None = None,
    topic_prefix: str = "slmops/v1",
) -> int:
    fleet = Fleet(workdir=workdir, console=console, mqtt_url=mqtt_url, topic_prefix=topic_prefix)
    return run_stoppable(fleet, console, lambda: _run_fleet(fleet, devices, keep, console))


def run_stoppable(fleet: Fleet, console: Console, body: Callable[[], int]) -> int:
    """Run a demo's body; SIGTERM, SIGINT or SIGHUP stop it, and every process it started goes with it."""
    with stop_signals_unwind():
        try:
            return body()
        except DemoStopped as stopped:
            console.log(f"{stopped}: stopping the control plane and the agents")
            return 128 + stopped.signum
        finally:
            _ignore_stop_signals()
            fleet.shutdown()


def _run_fleet(fleet: Fleet, devices: int, keep: bool, console: Console) -> int:
    started = time.monotonic()
    workdir, mqtt_url = fleet.workdir, fleet.mqtt_url
    broker = mqtt_url or f"embedded MQTT on :{fleet.mqtt_port}"
    console.log(f"control plane: {fleet.base} (SQLite + {broker}), work dir {workdir}")
    api = start_control_plane(fleet)
    register_models(fleet, api)
    console.log(
        f"registered tinyllama 1.0.0, 2.0.0 and 3.0.0 (3.0.0 has {SLOW_LAYERS} layers, not 2: deliberately slower)"
    )
    start_agents(fleet, api, devices)
    console.log(f"{devices} agents enrolled and online")
    for port in fleet.agent_ports:
        threading.Thread(target=load_generator, args=(fleet, port), daemon=True).start()
    results = [run_rollout(api, console, v) for v in ("1.0.0", "2.0.0", "3.0.0")]
    verified = summarise(console, results, api)
    return conclude(fleet, console, results, started, keep, verified=verified)
