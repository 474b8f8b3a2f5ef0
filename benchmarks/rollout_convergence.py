"""Promote -> every device acknowledged, for N simulated devices, next to a raw retained publish.

A real control plane (in process, SQLite or --database-url, the fleet runtime on the broker)
rolls a version out to N simulated devices, each its own MQTT connection and credential. We time
from the POST /v1/rollouts to (a) every device holding its desired state and (b) the control
plane having ingested every device's acknowledgement (state with the desired message id). The
baseline is N retained QoS 1 messages published raw to one live subscriber on the same broker.

    .venv/bin/python benchmarks/rollout_convergence.py --devices 1000   # target ratio <= 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.mqtt_retained import run_once  # noqa: E402
from control_plane import db  # noqa: E402
from control_plane.api.main import create_app  # noqa: E402
from control_plane.config import Settings  # noqa: E402
from control_plane.models import DesiredStateRow, Device, Role  # noqa: E402
from control_plane.services import auth  # noqa: E402
from shared.topics import Topics  # noqa: E402
from slmops.mqtt.client import MqttClient  # noqa: E402
from slmops.simulator import SimBehaviour, SimDevice  # noqa: E402
from slmops.tinymodels.gguf_tiny import write_tiny_gguf  # noqa: E402


def _acknowledged(engine, rollout_version: str) -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        stmt = (
            select(func.count())
            .select_from(Device)
            .join(DesiredStateRow, col(DesiredStateRow.device_id) == Device.id)
            .where(DesiredStateRow.version == rollout_version, Device.acked_message_id == DesiredStateRow.message_id)
        )
        return int(session.exec(stmt).one())


class AckObserver:
    """Watches the broker itself: the moment every device has published an acknowledgement (a state
    naming the desired message id the control plane sent it), before the control plane stores it."""

    def __init__(self, url: str, topics: Topics, n: int) -> None:
        self.n = n
        self.topics = topics
        self.sent: dict[str, str] = {}  # device id -> desired message id
        self.acked: dict[str, str] = {}  # device id -> acknowledged desired message id
        self.all_acked_at: float | None = None
        self._lock = threading.Lock()
        self.client = MqttClient(url, client_id=f"bench-observer-{uuid.uuid4().hex[:6]}")

    def start(self) -> None:
        self.client.start()
        self.client.subscribe(self.topics.all_devices("desired"), self._on_desired, qos=0)
        self.client.subscribe(self.topics.all_devices("state"), self._on_state, qos=0)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.sent[topic.split("/")[-2]] = json.loads(payload)["message_id"]
            self._check()

    def _on_state(self, topic: str, payload: bytes) -> None:
        acked = json.loads(payload).get("desired_message_id")
        if acked:
            with self._lock:
                self.acked[topic.split("/")[-2]] = acked
                self._check()

    def _check(self) -> None:
        if self.all_acked_at is None and len(self.acked) >= self.n:
            if sum(1 for d, m in self.sent.items() if self.acked.get(d) == m) >= self.n:
                self.all_acked_at = time.perf_counter()

    def stop(self) -> None:
        self.client.stop(publish_offline=False)


def _mark_progress(engine: Any, marks: dict[str, float], start: float, acked: int) -> None:
    with Session(engine) as session:
        rows = session.exec(select(DesiredStateRow.published_message_id, DesiredStateRow.message_id)).all()
    if "assigned" not in marks and len(rows) > 0:
        marks["assigned"] = time.perf_counter() - start
        print(f"  desired states written after {marks['assigned']:.3f} s ({len(rows)})", flush=True)
    if "published" not in marks and rows and all(p == m for p, m in rows):
        marks["published"] = time.perf_counter() - start
        print(f"  all published after {marks['published']:.3f} s; acked so far {acked}", flush=True)


def _raise_fd_limit() -> None:
    # Every simulated device holds a socket in this process: 1,000 devices pass the default 1,024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    _raise_fd_limit()
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    n = args.devices
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = args.database_url or f"sqlite:///{work / 'bench.db'}"
        db.upgrade(url)
        settings = Settings(
            data_dir=work,
            database_url=url,
            mqtt_url=args.broker,
            controller_tick_s=0.05,
            mqtt_topic_prefix=f"slmops-bench/{uuid.uuid4().hex[:8]}",
            mqtt_client_id=f"cp-bench-{uuid.uuid4().hex[:6]}",
        )
        app = create_app(settings)
        with TestClient(app) as client:
            engine = app.state.engine
            with Session(engine) as session:
                _, token = auth.create_token(session, name="bench", role=Role.admin)
                session.commit()
            headers = {"Authorization": f"Bearer {token}"}
            client.post("/v1/models", json={"name": "bench"}, headers=headers).raise_for_status()
            model = write_tiny_gguf(work / "m.gguf", seed=1)
            with model.open("rb") as fh:
                client.post("/v1/models/bench/versions", data={"version": "1"}, files={"file": fh}, headers=headers)
            creds = _enroll(client, headers, n)
            workers, stop = _start_device_processes(settings, creds)
            print(f"{n} simulated devices connected in {len(workers)} processes", flush=True)
            plan = {
                "model": "bench",
                "version": "1",
                "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
                "gates": {"min_activated_fraction": 0, "max_error_rate": None, "max_p95_latency_ratio": None},
            }
            observer = AckObserver(args.broker, Topics(settings.mqtt_topic_prefix), n)
            observer.start()
            start = time.perf_counter()
            client.post("/v1/rollouts", json=plan, headers=headers).raise_for_status()
            created = time.perf_counter() - start
            marks: dict[str, float] = {}
            while (acked := _acknowledged(engine, "1")) < n:
                _mark_progress(engine, marks, start, acked)
                time.sleep(0.02)
            acknowledged = time.perf_counter() - start
            observer.stop()
            if observer.all_acked_at is None:
                raise SystemExit("the observer missed acknowledgements")
            devices_acked = observer.all_acked_at - start
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
    baseline = run_once(args.broker, n, payload_size=600)
    print(f"devices                               {n}")
    raw = baseline.live_received_s
    print(f"raw retained publish, live subscriber {raw:8.3f} s")
    print(f"rollout: POST /v1/rollouts returned   {created:8.3f} s")
    ratio = devices_acked / raw
    print(f"rollout: every device acknowledged    {devices_acked:8.3f} s  ratio {ratio:5.2f}  (target <= 2)")
    print(f"rollout: control plane stored them    {acknowledged:8.3f} s  ratio {acknowledged / raw:5.2f}")


def _enroll(client: TestClient, headers: dict[str, str], n: int) -> list[dict[str, str]]:
    creds = []
    for i in range(n):
        created = client.post("/v1/devices", json={"name": f"sim-{i:05d}"}, headers=headers).json()
        creds.append(client.post("/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"]}).json())
    return creds


# paho waits on select(), which cannot watch file descriptors above 1,024: about 300 connections
# per process. The simulated fleet therefore runs in several processes.
DEVICES_PER_PROCESS = 250


def _run_devices(url: str, prefix: str, creds: list[dict[str, str]], ready: Any, stop: Any) -> None:
    _raise_fd_limit()
    topics = Topics(prefix)
    devices = [
        SimDevice(url, topics, c["device_id"], c["device_secret"], SimBehaviour(apply_delay_s=0.0)) for c in creds
    ]
    for device in devices:
        device.start()
    ready.put(len(devices))
    stop.wait()
    for device in devices:
        device.stop()


def _start_device_processes(settings: Settings, creds: list[dict[str, str]]) -> tuple[list[Any], Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    workers = []
    for i in range(0, len(creds), DEVICES_PER_PROCESS):
        chunk = creds[i : i + DEVICES_PER_PROCESS]
        worker = ctx.Process(
            target=_run_devices, args=(settings.mqtt_url, settings.mqtt_topic_prefix, chunk, ready, stop)
        )
        worker.start()
        workers.append(worker)
    for _ in workers:
        ready.get(timeout=300)
    return workers, stop


if __name__ == "__main__":
    main()
