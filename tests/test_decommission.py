"""Decommissioning a device: its credential stops at once on HTTP and on both brokers, it leaves
every rollout, and only a new enrollment token brings it back."""

from __future__ import annotations

import base64

import pytest
from sqlmodel import Session

from control_plane.models import DesiredStateRow
from tests.support.lifecycle import HARDWARE, NO_WAIT, audit_actions, enrolled_device, referenced_version
from tests.support.mqtt import RawClient
from tests.test_broker_identity import _device, _settings, broker_for, control_plane, emptied  # noqa: F401


def _basic(device_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()}


def test_a_decommissioned_device_is_refused_and_leaves_its_rollouts(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers
):
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    created = client.post("/v1/devices", json={"name": "old-kiosk"}, headers=admin_headers).json()
    first_token = created["enrollment_token"]
    cred = client.post("/v1/devices/enroll", json={"enrollment_token": first_token, "hardware": HARDWARE}).json()
    device_id, secret = cred["device_id"], cred["device_secret"]
    enrolled_device(client, admin_headers, "other")
    stages = [{"name": "all", "percent": 100, "min_bake_s": 0}]
    rollout = client.post(
        "/v1/rollouts",
        json={"model": "m", "version": "1", "stages": stages, "gates": NO_WAIT},
        headers=operator_headers,
    ).json()
    assert rollout["devices"] == {"assigned": 2}
    assert client.get("/v1/devices/me", headers=_basic(device_id, secret)).status_code == 200

    refused = client.post(f"/v1/devices/{device_id}/decommission", headers=operator_headers)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    done = client.post(f"/v1/devices/{device_id}/decommission", headers=admin_headers)
    assert done.status_code == 200 and done.json()["status"] == "decommissioned"
    me = client.get("/v1/devices/me", headers=_basic(device_id, secret))
    assert me.status_code == 401 and me.json()["code"] == "unauthenticated"
    assert client.get(f"/v1/rollouts/{rollout['id']}", headers=operator_headers).json()["devices"] == {"assigned": 1}
    with Session(engine) as session:
        assert session.get(DesiredStateRow, device_id) is None
    [entry] = audit_actions(engine, "device.decommission")
    assert entry.target == device_id and entry.detail["rollouts_left"] == 1
    again = client.post(f"/v1/devices/{device_id}/decommission", headers=admin_headers)
    assert again.status_code == 409 and again.json()["code"] == "invalid_state"

    stale = client.post("/v1/devices/enroll", json={"enrollment_token": first_token, "hardware": HARDWARE})
    assert stale.status_code == 401 and stale.json()["code"] == "enrollment_token_invalid"
    fresh = client.post(f"/v1/devices/{device_id}/enrollment-token", headers=admin_headers).json()["enrollment_token"]
    back = client.post("/v1/devices/enroll", json={"enrollment_token": fresh, "hardware": HARDWARE})
    assert back.status_code == 201 and back.json()["device_id"] == device_id
    assert client.get("/v1/devices/me", headers=_basic(device_id, back.json()["device_secret"])).status_code == 200


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_decommission_closes_the_devices_broker_connection(kind, tmp_path, db_url, emptied):  # type: ignore[no-untyped-def]  # noqa: F811
    with broker_for(kind, tmp_path) as (broker, device_port):
        with control_plane(_settings(tmp_path, db_url, broker, device_port), emptied, broker) as fleet:
            device_id, secret = fleet.enroll("gw-1")
            url = fleet.device_url(device_id, secret)
            live = RawClient(url, device_id, clean_session=False)
            try:
                assert live.accepted and not live.closed.is_set()
                done = fleet.client.post(f"/v1/devices/{device_id}/decommission", headers=fleet.admin)
                assert done.status_code == 200, done.text
                assert live.closed.wait(5), "the broker kept the decommissioned device's connection open"
            finally:
                live.close()
            again = RawClient(url, device_id, clean_session=True)
            assert not again.accepted
            again.close()
            assert _device(emptied, device_id).status == "decommissioned"
