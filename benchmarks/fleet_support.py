"""Shared pieces of the fleet benchmarks: a fresh PostgreSQL database, a private Mosquitto, a real
`slmops server` process, and the REST calls that prepare a model version and a fleet."""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def fresh_postgres(prefix: str = "slmops_bench") -> Iterator[str]:
    """A database created for this run and dropped after it."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def private_mosquitto_config(port: int, workdir: Path) -> str:
    # The system Mosquitto keeps the default max_queued_messages (1000): a control plane taking a
    # 10,000-device burst on its QoS 1 subscription would lose messages there. Anonymous, no ACL:
    # device credentials are sent but not checked (the ACL is tested in tests/test_mqtt_isolation.py).
    return "\n".join(
        [
            "per_listener_settings false",
            "allow_anonymous true",
            f"listener {port} 127.0.0.1",
            "max_queued_messages 1000000",
            "max_inflight_messages 1000",
            f"pid_file {workdir / 'mosquitto.pid'}",
            # Started as root, Mosquitto would switch to `mosquitto`, who cannot write in our temp dir.
            *([f"user {getpass.getuser()}"] if os.geteuid() == 0 else []),
            "log_dest stderr",
            "log_type error",
            "",
        ]
    )


@contextlib.contextmanager
def private_mosquitto() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = MosquittoProcess(
            Path(tmp), topics=Topics("slmops-bench"), port=port, config=private_mosquitto_config(port, Path(tmp))
        )
        broker.start()
        BROKER_PIDS[broker.url()] = broker.pid or 0
        try:
            yield broker.url()
        finally:
            broker.stop()


BROKER_PIDS: dict[str, int] = {}  # private broker URL -> its process id (for CpuMeter)


class CpuMeter:
    """CPU seconds (user + system) used by each process of a fleet benchmark: the server, the
    broker, PostgreSQL (every backend; other databases' too, if anything else runs), and this
    process (the simulated devices). Unlike wall time it barely moves when a neighbour on the
    host takes the cores, so figures from different days compare; a ratio of wall times does not
    say whether the control plane got slower or the machine did."""

    def __init__(self, server: Server, mqtt_url: str) -> None:
        self._fixed = {"server": server.process.pid, "broker": BROKER_PIDS[mqtt_url], "simulator": os.getpid()}

    def read(self) -> dict[str, float]:
        out = {role: _cpu_s(pid) for role, pid in self._fixed.items()}
        out["postgres"] = sum(_cpu_s(p.pid) for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres")
        return out

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {f"cpu_{role}": after[role] - before[role] for role in before}


def _cpu_s(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0  # a backend that ended between two reads: its share is lost, not double-counted
    return float(times.user + times.system)


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    topic_prefix: str

    def rss_mb(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss) / 2**20


@contextlib.contextmanager
def slmops_server(
    database_url: str,
    mqtt_url: str,
    *,
    tick_s: float = 1.0,
    data_dir: Path | None = None,
    topic_prefix: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[Server]:
    """`slmops server` in its own process (what an operator runs), with an admin token. A
    `data_dir` and `topic_prefix` kept across starts let a benchmark restart it under the same
    fleet with other settings (`env_extra`)."""
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(data_dir or scratch)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        port = free_port()
        prefix = topic_prefix or f"slmops-bench/{uuid.uuid4().hex[:8]}"
        env = (
            os.environ
            | {
                "SLMOPS_DATA_DIR": tmp,
                "SLMOPS_DATABASE_URL": database_url,
                "SLMOPS_MQTT_URL": mqtt_url,
                "SLMOPS_MQTT_TOPIC_PREFIX": prefix,
                "SLMOPS_MQTT_CLIENT_ID": f"cp-bench-{uuid.uuid4().hex[:6]}",
                "SLMOPS_PORT": str(port),
                "SLMOPS_CONTROLLER_TICK_S": str(tick_s),
            }
            | (env_extra or {})
        )
        slmops = [str(Path(sys.executable).with_name("slmops"))]
        token = subprocess.run(
            [*slmops, "token", "create"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        # SLMOPS_BENCH_SERVER_LOG keeps the server's log after the run (timings of ticks and publishes).
        log = Path(os.environ.get("SLMOPS_BENCH_SERVER_LOG") or Path(tmp) / "server.log").open("ab")
        process = subprocess.Popen([*slmops, "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process)
            yield Server(url, token, process, prefix)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"slmops server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    raise SystemExit("slmops server did not become healthy")


def push_version(server: Server, model: str, version: str, path: Path) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        if client.get(f"/v1/models/{model}").status_code == 404:
            client.post("/v1/models", json={"name": model}).raise_for_status()
        with path.open("rb") as fh:
            client.post(
                f"/v1/models/{model}/versions", data={"version": version}, files={"file": fh}
            ).raise_for_status()


def start_rollout(server: Server, model: str, version: str) -> str:
    plan = {
        "model": model,
        "version": version,
        "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
        "gates": {"min_activated_fraction": 0, "max_error_rate": None, "max_p95_latency_ratio": None},
    }
    headers = {"Authorization": f"Bearer {server.token}"}
    response = _client().post(f"{server.url}/v1/rollouts", json=plan, headers=headers, timeout=120)
    response.raise_for_status()
    return str(response.json()["id"])


def wait_completed(server: Server, timeout_s: float = 60) -> None:
    """The previous rollout must end before the next one may cover the same devices (409 otherwise)."""
    headers = {"Authorization": f"Bearer {server.token}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = httpx.get(f"{server.url}/v1/rollouts", params={"state": "running"}, headers=headers).json()
        if not active["data"]:
            return
        time.sleep(0.1)
    raise SystemExit("a rollout did not complete")


@functools.cache
def _client() -> httpx.Client:
    """One client for the run: building an httpx.Client (its TLS context) took ~30 ms, which a
    timed POST would otherwise include."""
    return httpx.Client()
