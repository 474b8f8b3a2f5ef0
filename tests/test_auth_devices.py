"""Operator roles, device enrollment and credentials, device listing, audit trail."""

from __future__ import annotations

import base64
from datetime import timedelta

from sqlmodel import Session, select

from control_plane.models import AuditEntry, Device, utcnow
from tests.support.assign import assign_version


def _basic(device_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()}


def _make_device(client, admin_headers, name: str, **labels: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    response = client.post("/v1/devices", json={"name": name, "labels": labels}, headers=admin_headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _enroll(client, token: str):  # type: ignore[no-untyped-def]
    hardware = {"cpu_model": "test", "cpu_cores": 4, "ram_mb": 8192, "arch": "x86_64", "agent_version": "0.1"}
    return client.post("/v1/devices/enroll", json={"enrollment_token": token, "hardware": hardware})


def test_missing_bad_and_weak_credentials(client, viewer_headers, operator_headers):  # type: ignore[no-untyped-def]
    none = client.get("/v1/models")
    assert none.status_code == 401 and none.json()["code"] == "unauthenticated"
    assert none.headers["content-type"].startswith("application/problem+json")
    bad = client.get("/v1/models", headers={"Authorization": "Bearer slm_not-a-real-token"})
    assert bad.status_code == 401
    assert client.get("/v1/models", headers=viewer_headers).status_code == 200
    weak = client.post("/v1/models", json={"name": "x"}, headers=viewer_headers)
    assert weak.status_code == 403 and weak.json()["code"] == "forbidden"
    assert weak.json()["required_role"] == "operator"
    not_admin = client.post("/v1/devices", json={"name": "d"}, headers=operator_headers)
    assert not_admin.status_code == 403
    assert client.get("/v1/tokens", headers=operator_headers).status_code == 403


def test_token_lifecycle_and_revocation(client, admin_headers):  # type: ignore[no-untyped-def]
    created = client.post("/v1/tokens", json={"name": "ci", "role": "viewer"}, headers=admin_headers)
    assert created.status_code == 201
    token = created.json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    listed = client.get("/v1/tokens", headers=admin_headers).json()["data"]
    assert all("token" not in t for t in listed) and any(t["name"] == "ci" for t in listed)
    assert client.delete(f"/v1/tokens/{created.json()['id']}", headers=admin_headers).status_code == 200
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_enrollment_once_then_device_credential(client, admin_headers, operator_headers, tiny_gguf, engine):  # type: ignore[no-untyped-def]
    device = _make_device(client, admin_headers, "kiosk-1", region="eu")
    assert device["status"] == "pending_enrollment"
    enrolled = _enroll(client, device["enrollment_token"])
    assert enrolled.status_code == 201, enrolled.text
    cred = enrolled.json()
    assert cred["device_id"] == device["id"] and len(cred["device_secret"]) >= 32

    again = _enroll(client, device["enrollment_token"])
    assert again.status_code == 409 and again.json()["code"] == "enrollment_token_used"
    unknown = _enroll(client, "enr_unknown-token-value")
    assert unknown.status_code == 401 and unknown.json()["code"] == "enrollment_token_invalid"

    device_headers = _basic(cred["device_id"], cred["device_secret"])
    me = client.get("/v1/devices/me", headers=device_headers)
    assert me.status_code == 200 and me.json()["hardware"]["ram_mb"] == 8192
    assert me.json()["status"] == "offline"
    # A device credential can never act as an operator, not even read the registry.
    for method, path in [("get", "/v1/models"), ("post", "/v1/models"), ("get", "/v1/devices")]:
        response = getattr(client, method)(
            path, headers=device_headers, **({"json": {"name": "x"}} if method == "post" else {})
        )
        assert response.status_code == 403, (method, path, response.status_code)
    wrong = client.get("/v1/devices/me", headers=_basic(cred["device_id"], "wrong-secret"))
    assert wrong.status_code == 401

    # ...but it may download the artifacts of versions it is assigned (tests/test_artifact_refs.py).
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    with tiny_gguf.open("rb") as fh:
        up = client.post(
            "/v1/models/m/versions",
            data={"version": "1"},
            files={"file": ("t.gguf", fh)},
            headers=operator_headers,
        )
    sha = up.json()["artifacts"][0]["sha256"]
    assert client.get(f"/v1/artifacts/{sha}", headers=device_headers).status_code == 404
    assign_version(engine, cred["device_id"], model="m", version="1")
    assert client.get(f"/v1/artifacts/{sha}", headers=device_headers).status_code == 200


def test_expired_enrollment_token_is_refused(client, admin_headers, engine):  # type: ignore[no-untyped-def]
    device = _make_device(client, admin_headers, "late-1")
    with Session(engine) as session:
        row = session.get(Device, device["id"])
        row.enrollment_expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    expired = _enroll(client, device["enrollment_token"])
    assert expired.status_code == 401 and expired.json()["code"] == "enrollment_token_expired"


def test_reissued_token_replaces_credential(client, admin_headers):  # type: ignore[no-untyped-def]
    device = _make_device(client, admin_headers, "gw-1")
    cred = _enroll(client, device["enrollment_token"]).json()
    reissued = client.post(f"/v1/devices/{device['id']}/enrollment-token", headers=admin_headers)
    assert reissued.status_code == 201
    assert client.get("/v1/devices/me", headers=_basic(cred["device_id"], cred["device_secret"])).status_code == 401
    fresh = _enroll(client, reissued.json()["enrollment_token"])
    assert fresh.status_code == 201


def test_list_devices_by_selector_status_and_pages(client, admin_headers, viewer_headers):  # type: ignore[no-untyped-def]
    _make_device(client, admin_headers, "a", region="eu", tier="canary")
    _make_device(client, admin_headers, "b", region="eu", tier="main")
    _make_device(client, admin_headers, "c", region="us", tier="canary")
    d = _make_device(client, admin_headers, "d", region="eu")
    _enroll(client, d["enrollment_token"])

    def names(**params: str) -> list[str]:
        response = client.get("/v1/devices", params=params, headers=viewer_headers)
        assert response.status_code == 200, response.text
        return sorted(x["name"] for x in response.json()["data"])

    assert names(selector="region=eu,tier=canary") == ["a"]
    assert names(selector="region=eu") == ["a", "b", "d"]
    assert names(selector="tier") == ["a", "b", "c"]
    assert names(selector="tier!=canary") == ["b", "d"]
    assert names(status="offline") == ["d"]
    assert names(status="pending_enrollment", selector="tier=canary") == ["a", "c"]
    page1 = client.get("/v1/devices", params={"limit": 3}, headers=viewer_headers).json()
    page2 = client.get(
        "/v1/devices", params={"limit": 3, "cursor": page1["next_cursor"]}, headers=viewer_headers
    ).json()
    assert len(page1["data"]) == 3 and len(page2["data"]) == 1 and page2["next_cursor"] is None
    bad = client.get("/v1/devices", params={"selector": "region=eu=x"}, headers=viewer_headers)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_selector"


def test_every_mutation_is_audited(client, admin_headers, operator_headers, engine):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "audited"}, headers={**operator_headers, "X-Request-ID": "req-123"})
    device = _make_device(client, admin_headers, "aud-1")
    _enroll(client, device["enrollment_token"])
    client.post("/v1/tokens", json={"name": "t", "role": "viewer"}, headers=admin_headers)
    with Session(engine) as session:
        entries = session.exec(select(AuditEntry)).all()
    by_action = {e.action: e for e in entries}
    assert {"model.create", "device.create", "device.enroll", "token.create"} <= set(by_action)
    assert by_action["model.create"].request_id == "req-123"
    assert by_action["model.create"].actor == "token:test-operator"
    assert by_action["model.create"].target == "audited"
    trail = client.get("/v1/audit", params={"action": "device.enroll"}, headers=admin_headers).json()["data"]
    assert [e["target"] for e in trail] == [device["id"]]


def test_health_and_ready(client):  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "migrations": "ok"}
    unknown = client.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
