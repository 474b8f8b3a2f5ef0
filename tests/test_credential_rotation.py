"""Credential rotation: the agent fetches and stores its new secret while it keeps serving; the
old secret works for the grace period and then stops, on HTTP and on the embedded broker."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from control_plane.api.main import create_app
from control_plane.config import Settings
from shared.net import free_port
from tests.support.agent import AgentProcess
from tests.support.lifecycle import audit_actions, enrolled_device
from tests.support.mqtt import RawClient
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for
from tests.test_broker_identity import _settings, broker_for, control_plane, emptied  # noqa: F401


def _basic(device_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()}


def test_rotation_hands_out_a_new_secret_once_and_the_old_one_expires(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers
):
    cred = enrolled_device(client, admin_headers, "kiosk")
    device_id, old = cred["device_id"], cred["device_secret"]
    refused = client.post(f"/v1/devices/{device_id}/rotate-credential", json={}, headers=operator_headers)
    assert refused.status_code == 403
    early = client.post("/v1/devices/me/credential", headers=_basic(device_id, old))
    assert early.status_code == 409 and early.json()["code"] == "invalid_state"  # nobody asked for one

    asked = client.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": 1}, headers=admin_headers)
    assert asked.status_code == 202 and asked.json()["rotation_requested_at"]
    assert client.get("/v1/devices/me", headers=_basic(device_id, old)).json()["rotation_requested_at"]
    rotated = client.post("/v1/devices/me/credential", headers=_basic(device_id, old))
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["device_secret"]
    assert new != old
    me = client.get("/v1/devices/me", headers=_basic(device_id, new))
    assert me.status_code == 200 and me.json()["rotation_requested_at"] is None
    assert client.get("/v1/devices/me", headers=_basic(device_id, old)).status_code == 200  # grace period
    again = client.post("/v1/devices/me/credential", headers=_basic(device_id, new))
    assert again.status_code == 409  # sent once
    until = datetime.fromisoformat(rotated.json()["previous_valid_until"])
    time.sleep(max(0.0, until.timestamp() - time.time()) + 0.2)
    expired = client.get("/v1/devices/me", headers=_basic(device_id, old))
    assert expired.status_code == 401 and expired.json()["code"] == "unauthenticated"
    assert client.get("/v1/devices/me", headers=_basic(device_id, new)).status_code == 200
    assert [e.action for e in audit_actions(engine, "device.rotate_credential")] == ["device.rotate_credential"]
    token = client.post("/v1/devices/me/credential", headers=admin_headers)
    assert token.status_code == 403


def test_a_leaked_secret_cannot_take_the_rotation_from_the_agent(client, admin_headers) -> None:  # type: ignore[no-untyped-def]
    """Each fetch stages a fresh secret in place of the last; the first one used completes the
    rotation. A lost answer or a thief's earlier fetch no longer locks the agent out."""
    cred = enrolled_device(client, admin_headers, "kiosk-2")
    device_id, old = cred["device_id"], cred["device_secret"]
    asked = client.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": 60}, headers=admin_headers)
    assert asked.status_code == 202
    thief = client.post("/v1/devices/me/credential", headers=_basic(device_id, old))
    assert thief.status_code == 200, thief.text
    agent = client.post("/v1/devices/me/credential", headers=_basic(device_id, old))
    assert agent.status_code == 200, agent.text  # not 409: the rotation stays pending until used
    stolen, new = thief.json()["device_secret"], agent.json()["device_secret"]
    assert stolen != new
    assert client.get("/v1/devices/me", headers=_basic(device_id, stolen)).status_code == 401  # replaced
    me = client.get("/v1/devices/me", headers=_basic(device_id, new))
    assert me.status_code == 200 and me.json()["rotation_requested_at"] is None  # first use completes it
    assert client.get("/v1/devices/me", headers=_basic(device_id, old)).status_code == 200  # grace period
    again = client.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": 60}, headers=admin_headers)
    assert again.status_code == 202
    previous = client.post("/v1/devices/me/credential", headers=_basic(device_id, old))
    assert previous.status_code == 403 and previous.json()["code"] == "forbidden"  # only the current secret
    assert client.post("/v1/devices/me/credential", headers=_basic(device_id, new)).status_code == 200


@pytest.fixture
def fleet_app(tmp_path: Path, db_url: str, engine):  # type: ignore[no-untyped-def]
    """A control plane with its fleet runtime and embedded broker."""
    from sqlmodel import SQLModel

    settings = Settings(
        data_dir=tmp_path / "cp", database_url=db_url, mqtt_port=free_port(), controller_tick_s=0.2,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    yield create_app(settings, engine=engine)
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.mark.slow
def test_the_agent_rotates_its_credential_while_it_serves(fleet_app, admin_headers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with ServerThread(fleet_app, lifespan="on") as server:
        base = f"http://127.0.0.1:{server.port}"
        device = httpx.post(f"{base}/v1/devices", json={"name": "edge-1"}, headers=admin_headers).json()
        agent = AgentProcess(
            tmp_path / "agent", control_plane_url=base, enrollment_token=device["enrollment_token"],
            credential_check_s=0.3,
        )  # fmt: skip
        agent.start()
        failures: list[str] = []
        stop = threading.Event()

        def serve_checks() -> None:
            while not stop.wait(0.05):
                try:
                    if httpx.get(f"{agent.url}/healthz", timeout=10).status_code != 200:
                        failures.append("healthz")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

        checker = threading.Thread(target=serve_checks, daemon=True)
        try:
            stored = agent.data_dir / "credential.json"
            old = json.loads(stored.read_text())["device_secret"]
            wait_for(lambda: _status(base, admin_headers, device["id"]) == "online", what="the agent online over MQTT")
            checker.start()
            asked = httpx.post(f"{base}/v1/devices/{device['id']}/rotate-credential", json={"grace_s": 2},
                               headers=admin_headers)  # fmt: skip
            assert asked.status_code == 202
            wait_for(
                lambda: json.loads(stored.read_text())["device_secret"] != old, what="the agent to store a new secret"
            )
            new = json.loads(stored.read_text())["device_secret"]
            assert stored.stat().st_mode & 0o777 == 0o600
            me = httpx.get(f"{base}/v1/devices/me", headers=_basic(device["id"], new))
            assert me.status_code == 200
            wait_for(lambda: httpx.get(f"{base}/v1/devices/me", headers=_basic(device["id"], old)).status_code == 401,
                  what="the old secret to expire")  # fmt: skip
            mqtt = fleet_app.state.fleet.device_mqtt_url.replace("mqtt://", "")
            refused = RawClient(f"mqtt://{device['id']}:{old}@{mqtt}", device["id"], clean_session=True)
            assert not refused.accepted
            refused.close()
            # The agent's next CONNECT uses the new secret: take its session over, and it comes back
            # (its birth message after reconnecting moves last_seen past the takeover).
            taken_at = datetime.now(UTC)
            taken = RawClient(f"mqtt://{device['id']}:{new}@{mqtt}", device["id"], clean_session=True)
            assert taken.accepted
            taken.close()
            wait_for(
                lambda: _seen_online_since(base, admin_headers, device["id"], taken_at), what="the agent back online"
            )
            assert agent.state()["device_id"] == device["id"]
        finally:
            stop.set()
            if checker.is_alive():
                checker.join()
            agent.stop()
        assert failures == []


def _status(base: str, headers: dict[str, str], device_id: str) -> str:
    return str(httpx.get(f"{base}/v1/devices/{device_id}", headers=headers).json()["status"])


def _seen_online_since(base: str, headers: dict[str, str], device_id: str, since: datetime) -> bool:
    device = httpx.get(f"{base}/v1/devices/{device_id}", headers=headers).json()
    seen = device["last_seen"]
    return device["status"] == "online" and seen is not None and datetime.fromisoformat(seen) > since


@pytest.mark.mosquitto
def test_mosquitto_takes_the_new_secret_at_once(tmp_path, db_url, emptied):  # type: ignore[no-untyped-def]  # noqa: F811
    """Mosquitto's password file holds one hash per device: the rotated secret works on it as soon
    as its first HTTP use completes the rotation, and the old one only on HTTP for the grace period
    (deploy/mosquitto/README.md)."""
    with broker_for("mosquitto", tmp_path) as (broker, device_port):
        with control_plane(_settings(tmp_path, db_url, broker, device_port), emptied, broker) as fleet:
            device_id, old = fleet.enroll("gw-1")
            asked = fleet.client.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": 60},
                                      headers=fleet.admin)  # fmt: skip
            assert asked.status_code == 202
            new = fleet.client.post("/v1/devices/me/credential", headers=_basic(device_id, old)).json()["device_secret"]
            staged = RawClient(fleet.device_url(device_id, new), device_id, clean_session=True)
            assert not staged.accepted  # staged, not yet the device's secret
            staged.close()
            assert fleet.client.get("/v1/devices/me", headers=_basic(device_id, new)).status_code == 200  # completes
            accepted = RawClient(fleet.device_url(device_id, new), device_id, clean_session=True)
            assert accepted.accepted
            accepted.close()
            assert fleet.client.get("/v1/devices/me", headers=_basic(device_id, old)).status_code == 200
