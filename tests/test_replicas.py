"""Two `slmops server` replicas behind HAProxy on one PostgreSQL: the controller fails over.

Real processes throughout: both replicas, HAProxy from deploy/haproxy/haproxy.cfg, Mosquitto and
simulated devices. The replica holding the controller lock (control_plane/rollouts/leader.py) is killed -9
mid-rollout; the other takes the lock and finishes the rollout while an operator's client keeps
calling the API through the balancer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane import db
from control_plane.rollouts.leader import LOCK_KEY
from control_plane.telemetry import partitions
from control_plane.trust.releases import init_keys
from shared.net import free_port
from shared.topics import Topics
from slmops.cli.client import ApiClient, ApiError, ClientConfig, new_idempotency_key
from tests.support.haproxy import HAProxy, haproxy_binary
from tests.support.s3 import CREDENTIALS, TlsMotoServer
from tests.support.simulated import TelemetryPump, sim_config, start_sim_devices
from tests.support.waiting import wait_for
from tests.test_blob_store_s3 import bucket, moto  # noqa: F401  (fixtures: the S3 endpoint)
from tests.test_rollout_resilience import PLAN, ServerProcess, _cli_token, _setup_fleet, _state
from tests.test_rollouts import MOSQUITTO

DEVICES = 6
EXPIRED_DAY = date(2020, 1, 1)


def _expired_day(engine: sa.Engine) -> str:
    """A day partition far past retention, created now: only a live leader's rollup job drops it."""
    with Session(engine) as session:
        name = partitions.create_day(session, EXPIRED_DAY)
        session.commit()
    return name


def _partition_exists(engine: sa.Engine, name: str) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": f"{partitions.SCHEMA}.{name}"}).scalar() is not None
        )


def _controller_holder(engine: sa.Engine) -> str | None:
    """The application_name of the session holding the controller's advisory lock in this database
    (pg_locks spans the server's databases; a bigint key under 2**32 shows as objid, classid 0)."""
    query = sa.text(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = :key "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with engine.connect() as conn:
        return conn.execute(query, {"key": LOCK_KEY}).scalar_one_or_none()


@dataclass
class OperatorLoop:
    """An operator's client on the balancer: reads and idempotent writes, back to back, with the
    retries the CLI makes (slmops/cli/client.py). Every call that still fails is counted."""

    api: ApiClient
    rollout_id: str
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> OperatorLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                if n % 5 == 0:  # a write, as `slmops model create` sends it
                    self.api.post("/v1/models", {"name": f"during-{n}"}, idempotency_key=new_idempotency_key())
                else:
                    self.api.get(f"/v1/rollouts/{self.rollout_id}")
                    self.api.get("/v1/devices", limit=50)
            except ApiError as exc:
                self.failures.append(f"call {n}: {exc.one_line()}")
            self.calls += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            self._stop.wait(0.02)


@pytest.fixture
def pg_url(fresh_database_url) -> str:  # type: ignore[no-untyped-def]
    url = str(fresh_database_url("postgres"))
    db.upgrade(url)  # once, before the replicas start (each would otherwise race to migrate)
    return url


@pytest.fixture
def replicas(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[list[ServerProcess]]:
    """Two replicas on Mosquitto. `request.param`: "ingest-group" splits device messages between
    them; "s3" keeps artifacts in the test S3 endpoint (`bucket`), as replicas serving real agents must."""
    keys = tmp_path / "keys"
    keys.mkdir()
    init_keys(keys)  # one release key for all replicas: devices verify whichever one leads
    shared = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")} | {
        "SLMOPS_MQTT_URL": MOSQUITTO,
        "SLMOPS_MQTT_TOPIC_PREFIX": f"slmops-test/{uuid.uuid4().hex[:10]}",
        "SLMOPS_CONTROLLER_TICK_S": "0.2",
        "SLMOPS_TELEMETRY_ROLLUP_INTERVAL_S": "1",
        "SLMOPS_RELEASE_KEY_FILE": str(keys / "release.key"),
        "SLMOPS_ROOT_METADATA_FILE": str(keys / "root.json"),
    }
    if request.param == "ingest-group":
        shared["SLMOPS_MQTT_INGEST_GROUP"] = uuid.uuid4().hex
    if request.param == "s3":
        moto: TlsMotoServer = request.getfixturevalue("moto")
        shared |= {"SLMOPS_BLOB_STORE": "s3", "SLMOPS_S3_ENDPOINT_URL": moto.url, "AWS_CA_BUNDLE": moto.tls[0]}
        shared |= {"SLMOPS_S3_BUCKET": request.getfixturevalue("bucket"), **CREDENTIALS}
    started: list[ServerProcess] = []
    try:
        for name in ("replica-1", "replica-2"):
            workdir = tmp_path / name
            workdir.mkdir()
            env = shared | {
                "SLMOPS_PORT": str(free_port()),
                # The name pg_stat_activity shows: which replica holds the controller lock.
                "SLMOPS_DATABASE_URL": f"{pg_url}?application_name={name}",
                "SLMOPS_MQTT_CLIENT_ID": f"cp-{uuid.uuid4().hex[:8]}",
            }
            replica = ServerProcess(workdir, env)
            replica.start()
            started.append(replica)
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def balancer(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[HAProxy]:
    haproxy_binary()
    proxy = HAProxy(tmp_path, [f"127.0.0.1:{r.port}" for r in replicas]).start()
    try:
        wait_for(lambda: proxy.server_states() == {"replica-1": "UP", "replica-2": "UP"}, 15, "both replicas UP")
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def engine_pg(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.mosquitto
@pytest.mark.parametrize("replicas", ["every-replica-ingests", "ingest-group"], indirect=True)
def test_the_other_replica_finishes_the_rollout_when_the_leader_is_killed(  # type: ignore[no-untyped-def]
    replicas: list[ServerProcess], balancer: HAProxy, engine_pg: sa.Engine, tiny_gguf, tiny_gguf_other
) -> None:
    """Without an ingest group every replica reads every device message (ingest is idempotent by
    message id), so the survivor alone finishes. In a group, Mosquitto 2.0 keeps routing the dead
    member's share into its persistent session: the rollout may wait for what a device reported
    there (its new version) until that replica restarts, as its supervisor restarts it, and drains it."""
    grouped = "SLMOPS_MQTT_INGEST_GROUP" in replicas[0].env
    leader_name = wait_for(lambda: _controller_holder(engine_pg), 15, "a controller")
    by_name = {"replica-1": replicas[0], "replica-2": replicas[1]}
    leader, (survivor_name,) = by_name[leader_name], set(by_name) - {leader_name}
    api = httpx.Client(base_url=balancer.url, timeout=10)
    admin, op = _cli_token(replicas[0], "admin"), _cli_token(replicas[0], "operator")
    creds = _setup_fleet(api, admin, op, [tiny_gguf, tiny_gguf_other], DEVICES)
    devices = start_sim_devices(MOSQUITTO, Topics(replicas[0].env["SLMOPS_MQTT_TOPIC_PREFIX"]), creds, sim_config())
    operator = ApiClient(ClientConfig(server=balancer.url, token=op["Authorization"].split()[1]), timeout=10)
    try:
        with TelemetryPump(devices):
            first = api.post("/v1/rollouts", json={"model": "tiny", "version": "1", **PLAN}, headers=op).json()
            wait_for(lambda: _state(api, op, first["id"]) == "completed", timeout_s=60, what="v1 rollout")
            second = api.post("/v1/rollouts", json={"model": "tiny", "version": "2", **PLAN}, headers=op).json()
            with OperatorLoop(operator, second["id"]) as loop:
                wait_for(lambda: sum(d.current_version == "2" for d in devices) == 1, what="canary on v2")
                applied_before = {d.device_id: len(d.applied) for d in devices}
                killed_at, calls_before = time.monotonic(), loop.calls
                leader.kill9()  # mid-rollout: the canary on v2, the rest still on v1
                wait_for(lambda: _controller_holder(engine_pg) == survivor_name, 30, "the survivor to take the lock")
                took_lock_s = time.monotonic() - killed_at
                expired = _expired_day(engine_pg)
                if grouped:
                    leader.start()  # its broker session still holds its share of the devices' messages
                    assert _controller_holder(engine_pg) == survivor_name  # back as a follower
                else:
                    wait_for(lambda: balancer.server_states()[leader_name] == "DOWN", 15, "the dead replica DOWN")
                wait_for(lambda: _state(api, op, second["id"]) == "completed", 90, "v2 finished")
                finished_s = time.monotonic() - killed_at
                # The leader's housekeeping moved too: retention drops whole day partitions.
                wait_for(lambda: not _partition_exists(engine_pg, expired), 30, "the survivor's retention")
                wait_for(lambda: loop.calls - calls_before >= 20, 60, "20 API calls after the kill")
            evaluations = api.get(f"/v1/rollouts/{second['id']}/evaluations", headers=op).json()
    finally:
        for device in devices:
            device.stop()
    routed_around = int(balancer.stats()["BACKEND"]["wredis"])  # requests HAProxy sent on to the other replica
    assert loop.failures == [], loop.failures
    assert routed_around >= 1  # some calls met the dead replica first
    assert {d.current_version for d in devices} == {"2"}
    for device in devices:  # no conflicting desired states from the two leaders
        assert len(device.applied) - applied_before[device.device_id] <= 1
    assert any(e["result"] == "pass" for e in evaluations)
    print(  # the figures in docs/performance.md (run with -s)
        f"\nfailover ({'ingest group' if grouped else 'every replica ingests'}): lock taken {took_lock_s:.2f} s, "
        f"rollout completed {finished_s:.2f} s after kill -9; {loop.calls} API calls "
        f"({routed_around} requests redispatched), {len(loop.failures)} failed, slowest {loop.slowest_s:.2f} s"
    )


ONE_STAGE_AT_A_TIME = {  # no latency or error gates: a real agent serves no traffic here
    "stages": [{"name": "canary", "count": 1, "min_bake_s": 1.0}, {"name": "rest", "percent": 100, "min_bake_s": 0}],
    "gates": {"min_activated_fraction": 1.0, "max_p95_latency_ratio": None, "max_error_rate": None},
}


def _spawn_agent(tmp_path: Path, control_plane_url: str, enrollment_token: str, trust: str) -> subprocess.Popen[bytes]:
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    config = agent_dir / "agent.toml"
    config.write_text(
        f'control_plane_url = "{control_plane_url}"\nenrollment_token = "{enrollment_token}"\n'
        f'data_dir = "{agent_dir}"\nlisten_port = {free_port()}\n'
        'threads = 1\ntelemetry_window_s = 1.0\ntrial_requests = 3\ntrial_seconds = 3\n'
        'watch_interval_s = 0.5\ndownload_allowed_hosts = ["127.0.0.1"]\n'
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")} | {"SSL_CERT_FILE": trust}
    with (agent_dir / "agent.log").open("ab") as log:  # trusts the S3 endpoint as a device trusts a private CA
        return subprocess.Popen(
            [sys.executable, "-m", "slmops", "agent", "--config", str(config)], env=env, stdout=log, stderr=log
        )


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.postgres
@pytest.mark.mosquitto
@pytest.mark.parametrize("replicas", ["s3"], indirect=True)
def test_a_real_agent_behind_the_balancer_gets_its_artifact_from_the_store_across_a_failover(  # type: ignore[no-untyped-def]
    replicas: list[ServerProcess], balancer: HAProxy, engine_pg: sa.Engine, request, tmp_path: Path, tiny_gguf
) -> None:
    """The production shape end to end: a real agent and simulated devices reach the replicas only
    through HAProxy; the leader dies mid-rollout; the agent verifies releases signed by whichever
    replica wrote them (one key) and downloads the bytes from the S3 endpoint, not from a replica."""
    store: TlsMotoServer = request.getfixturevalue("moto")  # the endpoint the replicas were started with
    store_key = f"GET /{replicas[0].env['SLMOPS_S3_BUCKET']}/blobs/sha256/"
    leader_name = wait_for(lambda: _controller_holder(engine_pg), 15, "a controller")
    leader = {"replica-1": replicas[0], "replica-2": replicas[1]}[leader_name]
    api = httpx.Client(base_url=balancer.url, timeout=30)
    admin, op = _cli_token(replicas[0], "admin"), _cli_token(replicas[0], "operator")
    creds = _setup_fleet(api, admin, op, [tiny_gguf], 2)
    sha256 = api.get("/v1/models/tiny/versions/1", headers=op).json()["artifacts"][0]["sha256"]
    enrollment = api.post("/v1/devices", json={"name": "kiosk"}, headers=admin).json()["enrollment_token"]
    agent = _spawn_agent(tmp_path, balancer.url, enrollment, store.tls[0])
    devices = start_sim_devices(MOSQUITTO, Topics(replicas[0].env["SLMOPS_MQTT_TOPIC_PREFIX"]), creds, sim_config())
    try:
        wait_for(lambda: _statuses(api, op).get("kiosk") == "online", 90, "the agent online")
        served_before = {name: int(row["bout"]) for name, row in balancer.stats().items()}
        rollout = api.post("/v1/rollouts", json={"model": "tiny", "version": "1", **ONE_STAGE_AT_A_TIME}, headers=op)
        assert rollout.status_code == 201, rollout.text
        wait_for(lambda: "1" in _versions(api, op).values(), 120, "the canary on version 1")
        leader.kill9()
        wait_for(lambda: _state(api, op, rollout.json()["id"]) == "completed", 180, "the rollout finished")
        assert _versions(api, op) == {"d0": "1", "d1": "1", "kiosk": "1"}
    finally:
        for device in devices:
            device.stop()
        agent.terminate()
        agent.wait(timeout=30)
    size = tiny_gguf.stat().st_size
    assert store.counted.bytes_out[store_key + sha256] == size  # once, from the store
    served = {name: int(row["bout"]) - served_before[name] for name, row in balancer.stats().items()}
    assert served["BACKEND"] < size // 10, served  # what both replicas sent through HAProxy: JSON, no model
    print(  # the figures in docs/performance.md (run with -s)
        f"\nreal agent: artifact {size} bytes; the S3 endpoint served {store.counted.bytes_out[store_key + sha256]}, "
        f"the replicas through HAProxy {served['replica-1']} + {served['replica-2']} bytes (API answers)"
    )


def _statuses(api: httpx.Client, op: dict[str, str]) -> dict[str, str]:
    return {d["name"]: d["status"] for d in api.get("/v1/devices", headers=op).json()["data"]}


def _versions(api: httpx.Client, op: dict[str, str]) -> dict[str, str | None]:
    return {d["name"]: d["current_version"] for d in api.get("/v1/devices", headers=op).json()["data"]}
