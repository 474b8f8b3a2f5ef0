"""The asyncio fleet simulator against the real Mosquitto and a real control plane (in process).

The devices are created and enrolled through the REST API (`enroll_fleet`), connect with their own
credentials, and the control plane's rollouts see them as it sees real agents.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import Role
from control_plane.services import auth
from control_plane.trust.releases import read_root_chain
from slmops.simulate import Credential, SimConfig, SimFleet, enroll_fleet, load_credentials, save_credentials
from tests.support.fleet import upload_version
from tests.support.waiting import wait_for

MOSQUITTO = "mqtt://127.0.0.1:1883"
PLAN = {
    "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
    "gates": {"max_p95_latency_ratio": None, "max_error_rate": None, "min_activated_fraction": 1.0},
}
pytestmark = pytest.mark.mosquitto


class LoopThread:
    """An event loop on its own thread, so the simulated fleet runs while the test polls the API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def fleet(tmp_path, db_url, engine) -> Iterator[tuple[TestClient, Settings, dict[str, str]]]:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=0.1,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    app = create_app(settings, engine=engine)
    with Session(engine) as session:
        _, token = auth.create_token(session, name="admin", role=Role.admin)
        session.commit()
    with TestClient(app) as client:
        yield client, settings, {"Authorization": f"Bearer {token}"}
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


def _enroll(client: TestClient, headers: dict[str, str], n: int) -> list[Credential]:
    # The REST calls go through the ASGI app the TestClient started (same database and fleet runtime).
    async def go() -> list[Credential]:
        transport = httpx.ASGITransport(app=client.app)
        token = headers["Authorization"].removeprefix("Bearer ")
        return await enroll_fleet("http://cp", token, n, mqtt_url=MOSQUITTO, transport=transport)

    return asyncio.run(go())


def _devices(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    return client.get("/v1/devices", params={"limit": 500}, headers=headers).json()["data"]  # type: ignore[no-any-return]


def _rollout_done(client: TestClient, headers: dict[str, str], rollout_id: str) -> dict[str, Any] | None:
    body = client.get(f"/v1/rollouts/{rollout_id}", headers=headers).json()
    return body if body["state"] in ("completed", "rolled_back", "aborted") else None


def _roll_out(client: TestClient, headers: dict[str, str], version: str) -> dict[str, Any]:
    created = client.post("/v1/rollouts", json={"model": "tiny", "version": version, **PLAN}, headers=headers)
    assert created.status_code == 201, created.text
    return wait_for(lambda: _rollout_done(client, headers, created.json()["id"]), 60, f"rollout of {version}")  # type: ignore[no-any-return]


def test_fifty_devices_roll_out_to_all_and_report(fleet, loop, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    client, settings, admin = fleet
    assert client.post("/v1/models", json={"name": "tiny"}, headers=admin).status_code == 201
    upload_version(client, admin, "tiny", "1", tiny_gguf)
    creds = _enroll(client, admin, 50)
    assert {c.topic_prefix for c in creds} == {settings.mqtt_topic_prefix}
    root = read_root_chain(settings.data_dir / "keys" / "root.json")  # the control plane's dev keys
    sim = SimFleet(creds, SimConfig(apply_delay_s=0.05, telemetry_interval_s=0.2, trusted_root=root))
    loop.run(sim.start(concurrency=25))
    try:
        devices = wait_for(lambda: (d := _devices(client, admin)) and all(x["status"] == "online" for x in d) and d)
        assert len(devices) == 50 and all(d["hardware"]["cpu_model"] == "sim" for d in devices)
        done = _roll_out(client, admin, "1")
        assert done["state"] == "completed", done
        assert sim.versions() == {"1": 50}
        wait_for(lambda: all(d["current_version"] == "1" for d in _devices(client, admin)), what="all acked")
        # Telemetry windows of the new version reach the control plane's store.
        wait_for(lambda: sim.stats.telemetry_sent >= 50, what="telemetry sent")
    finally:
        loop.run(sim.stop())
    assert sim.stats.applied == 50 and sim.stats.failed == 0
    # Each device verified the signed release with the agent's ReleaseGuard before acknowledging.
    assert (sim.stats.verified, sim.stats.refused) == (50, 0)
    # A clean stop publishes "offline" (retained), which the control plane records.
    wait_for(lambda: all(d["status"] == "offline" for d in _devices(client, admin)), what="devices offline")


def test_failure_rate_rolls_the_rollout_back(fleet, loop, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    client, _settings, admin = fleet
    assert client.post("/v1/models", json={"name": "tiny"}, headers=admin).status_code == 201
    upload_version(client, admin, "tiny", "1", tiny_gguf)
    upload_version(client, admin, "tiny", "2", tiny_gguf_other)
    config = SimConfig(apply_delay_s=0.05, telemetry_interval_s=None)
    sim = SimFleet(_enroll(client, admin, 20), config)
    loop.run(sim.start())
    try:
        assert _roll_out(client, admin, "1")["state"] == "completed"
        config.failure_rate = 0.5  # every agent shares the config: v2 fails on about half of them
        done = _roll_out(client, admin, "2")
        assert done["state"] == "rolled_back", done
        assert sim.stats.failed > 0
        # Devices that applied v2 are sent back to v1; those that failed never left it.
        wait_for(lambda: sim.versions() == {"1": 20}, what="every device back on v1")
    finally:
        loop.run(sim.stop())


def test_a_failed_first_rollout_leaves_every_device_serving_nothing(fleet, loop, tiny_gguf):  # type: ignore[no-untyped-def]
    """The devices had no model before: the rollback withdraws v1 (unload) over MQTT, and the
    fleet summary shows every device on its desired state once they serve nothing."""
    client, _settings, admin = fleet
    assert client.post("/v1/models", json={"name": "tiny"}, headers=admin).status_code == 201
    upload_version(client, admin, "tiny", "1", tiny_gguf)
    config = SimConfig(apply_delay_s=0.05, failure_rate=0.5, telemetry_interval_s=None)
    sim = SimFleet(_enroll(client, admin, 20), config)
    loop.run(sim.start())
    try:
        done = _roll_out(client, admin, "1")
        assert done["state"] == "rolled_back", done
        wait_for(lambda: sim.versions() == {None: 20}, what="every device serving nothing")
        assert {agent.state.reason for agent in sim.agents} == {
            "tiny 1 was withdrawn by the control plane: serving nothing"
        }
        summary = lambda: client.get("/v1/telemetry/summary", headers=admin).json()["not_on_desired"]  # noqa: E731
        wait_for(lambda: summary()["count"] == 0, what="every device on its desired state")
        assert {d["current_version"] for d in _devices(client, admin)} == {None}
    finally:
        loop.run(sim.stop())


def test_credentials_file_round_trip(tmp_path):  # type: ignore[no-untyped-def]
    creds = [Credential(f"d{i}", f"s{i}", "mqtt://127.0.0.1:1883", "p/x") for i in range(3)]
    path = tmp_path / "creds.json"
    save_credentials(path, creds)
    assert load_credentials(path) == creds
    assert load_credentials(path, "mqtt://other:1")[0].mqtt_url == "mqtt://other:1"
    assert path.stat().st_mode & 0o077 == 0  # device secrets are not world-readable


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("a/+/c", "a/b/c"), ("a/+/c", "a/b/d"), ("a/#", "a"), ("a/#", "a/b/c"), ("#", "a/b"), ("+", "a"),
        ("+", "a/b"), ("+/+", "/a"), ("a/+", "a/"), ("#", "$SYS/x"), ("+/x", "$SYS/x"), ("$SYS/#", "$SYS/x"),
        ("a/b", "a/b"), ("a/b", "a/b/c"), ("a/+/+", "a/b"), ("p/devices/+/state", "p/devices/d1/state"),
    ],
)  # fmt: skip
def test_control_plane_topic_matching_agrees_with_paho(topic_filter: str, topic: str) -> None:
    # The simulator's load made paho's matcher the control plane's hot spot; its replacement must agree.
    import paho.mqtt.client as paho

    from shared.mqtt.client import topic_matches

    assert topic_matches(topic_filter, topic) == paho.topic_matches_sub(topic_filter, topic)


class _Transport:
    """What MqttWire writes, one entry per transport.write call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False


def test_an_agent_acknowledges_and_reports_its_state_in_one_write() -> None:
    # A desired state applied at once: the PUBACK and the state it leads to leave in one send().
    from shared.desired import ArtifactRef, DesiredState
    from shared.messages import StateMessage, decode, encode
    from shared.topics import TopicKind
    from slmops.simulate import SimAgent, SimStats
    from slmops.simulate.wire import PUBACK, PUBLISH, MqttWire, _packet, _string

    async def deliver() -> tuple[list[bytes], SimAgent, SimStats]:
        stats = SimStats()
        config = SimConfig(apply_delay_s=0, telemetry_interval_s=None)
        agent = SimAgent(Credential("dev-1", "secret", "mqtt://127.0.0.1:1", "slmops-test/x"), config, stats)
        wire = MqttWire(agent._on_message, keepalive=0)
        transport = _Transport()
        wire.connection_made(transport)  # type: ignore[arg-type]
        agent._wire = wire
        desired = DesiredState(
            message_id="m-1", model="m", version="2", artifact=ArtifactRef(sha256="a" * 64, size_bytes=1, format="gguf")
        )
        body = _string(agent.topics.desired("dev-1")) + b"\x00\x07" + encode(desired)
        wire.data_received(_packet(PUBLISH, 0x02, body))  # QoS 1, packet id 7
        return transport.writes, agent, stats

    writes, agent, stats = asyncio.run(deliver())
    assert len(writes) == 1
    puback, publish = writes[0][:4], writes[0][4:]
    assert puback == bytes([PUBACK << 4, 2, 0, 7])
    assert publish[0] >> 4 == PUBLISH and publish[0] & 0x01  # retained
    # remaining length (one or two bytes), topic, packet id, then the state message
    header = 3 if publish[1] & 0x80 else 2
    topic_len = int.from_bytes(publish[header : header + 2], "big")
    topic = publish[header + 2 : header + 2 + topic_len].decode()
    state = decode(TopicKind.STATE, publish[header + 2 + topic_len + 2 :])
    assert topic == agent.topics.state("dev-1")
    assert isinstance(state, StateMessage) and state.desired_message_id == "m-1"
    assert state.current is not None and state.current.version == "2"
    assert stats.applied == 1 and agent.current_version == "2"


def test_a_simulated_device_refuses_a_release_its_root_does_not_sign() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.desired import ArtifactRef
    from slmops.simulate import SimAgent, SimStats
    from tests.support.releases import Authority

    authority = Authority()
    config = SimConfig(apply_delay_s=0, telemetry_interval_s=None, trusted_root=authority.chain[:1])
    stats = SimStats()
    agent = SimAgent(Credential("dev-1", "secret", "mqtt://127.0.0.1:1", "slmops-test/x"), config, stats)
    artifact = ArtifactRef(sha256="a" * 64, size_bytes=1, format="gguf")
    agent._apply_now(authority.desired(artifact, version="1"))
    agent._apply_now(authority.desired(artifact, version="2", key=Ed25519PrivateKey.generate()))
    assert (stats.applied, stats.verified, stats.refused) == (1, 1, 1)
    assert agent.current_version == "1" and agent.state.phase == "download_failed"
    assert (agent.state.reason or "").startswith("release_refused: unknown_key")


def test_a_fleet_wait_ends_on_the_applied_state_that_completes_it() -> None:
    # The wait is woken by the agent applying, not by a poll: it ends within the same loop turn.
    from shared.desired import ArtifactRef, DesiredState
    from slmops.simulate import SimFleet

    async def scenario() -> tuple[bool, bool, float, list[str], int]:
        creds = [Credential(f"dev-{i}", "secret", "mqtt://127.0.0.1:1", "slmops-test/x") for i in range(2)]
        fleet = SimFleet(creds, SimConfig(apply_delay_s=0, telemetry_interval_s=None))
        loop = asyncio.get_running_loop()
        for k, agent in enumerate(fleet.agents):
            desired = DesiredState(
                message_id=f"m-{k}", model="m", version="2",
                artifact=ArtifactRef(sha256="a" * 64, size_bytes=1, format="gguf"),
            )  # fmt: skip
            loop.call_later(0.05 * (k + 1), agent._apply_now, desired)
        start = loop.time()
        ok = await fleet.wait(lambda: fleet.stats.applied >= 2, timeout_s=5)
        took = loop.time() - start
        missed = await fleet.wait(lambda: fleet.stats.applied >= 3, timeout_s=0.05)
        ids = [str(agent.state.message_id) for agent in fleet.agents]
        return ok, missed, took, ids, len(fleet.stats.listeners)

    ok, missed, took, ids, listeners = asyncio.run(scenario())
    assert ok and not missed
    assert 0.1 <= took < 2  # not before the second apply (at 0.1 s), and well before the timeout
    assert len(set(ids)) == 2  # each applied state carries an envelope of its own
    assert listeners == 0  # both waits removed their listener
