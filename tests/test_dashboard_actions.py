"""Dashboard actions over HTTP: role-checked, refused from another origin, audited under the token's name."""

from __future__ import annotations

import re

from sqlmodel import Session

from control_plane.models import Role
from control_plane.services import auth
from tests.conftest import _token
from tests.support.lifecycle import NO_WAIT, audit_actions, enrolled_device, referenced_version, tick
from tests.test_rollout_rules import _report_active

ORIGIN = {"Origin": "http://testserver"}
PLAN = {
    "stages": [{"name": "canary", "count": 1, "min_bake_s": 3600}, {"name": "fleet", "percent": 100, "min_bake_s": 0}],
    "gates": NO_WAIT,
}


def _sign_in(client, engine, role: Role) -> None:  # type: ignore[no-untyped-def]
    client.cookies.clear()
    data = {"token": _token(engine, role), "next": "/"}
    response = client.post("/login", data=data, headers=ORIGIN, follow_redirects=False)
    assert response.status_code == 303


def _seed(client, admin, operator) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator)
    referenced_version(client, operator, "m", "1", "a")
    referenced_version(client, operator, "m", "2", "b")
    device = enrolled_device(client, admin, "kiosk-1")["device_id"]
    enrolled_device(client, admin, "kiosk-2")
    rollout = client.post("/v1/rollouts", json={"model": "m", "version": "1", **PLAN}, headers=operator).json()
    return rollout["id"], device


def _state(client, operator, rollout_id: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return client.get(f"/v1/rollouts/{rollout_id}", headers=operator).json()  # type: ignore[no-any-return]


def test_viewers_see_no_buttons_and_are_refused(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    rollout_id, device = _seed(client, admin_headers, operator_headers)
    _sign_in(client, engine, Role.viewer)
    for page in (f"/rollouts/{rollout_id}", "/registry", "/devices"):
        html = client.get(page).text
        assert "data-action" not in html and "data-confirm" not in html, page
    for path in (f"/rollouts/{rollout_id}/actions/abort", "/registry/m/1/recall", f"/devices/{device}/decommission"):
        refused = client.post(path, headers=ORIGIN, follow_redirects=False)
        assert refused.status_code == 403, path
    assert _state(client, operator_headers, rollout_id)["state"] == "running"

    _sign_in(client, engine, Role.operator)
    page = client.get(f"/rollouts/{rollout_id}").text
    assert 'data-action="promote"' in page
    assert 'data-action="recall"' in client.get("/registry").text
    assert 'data-action="decommission"' not in client.get("/devices").text  # admins only
    assert client.post(f"/devices/{device}/decommission", headers=ORIGIN).status_code == 403


def test_a_forged_cross_site_post_changes_nothing(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    rollout_id, _ = _seed(client, admin_headers, operator_headers)
    _sign_in(client, engine, Role.admin)
    attempts = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Referer": "http://evil.example/x"}, {}]
    for headers in attempts:
        forged = client.post(f"/rollouts/{rollout_id}/actions/abort", headers=headers, follow_redirects=False)
        assert forged.status_code == 403 and forged.json()["code"] == "cross_site_request", headers
    assert _state(client, operator_headers, rollout_id)["state"] == "running"
    assert audit_actions(engine, "rollout.abort") == []


def test_actions_run_and_are_audited_under_the_tokens_name(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    rollout_id, device = _seed(client, admin_headers, operator_headers)
    _sign_in(client, engine, Role.admin)
    promoted = client.post(f"/rollouts/{rollout_id}/actions/promote", headers=ORIGIN, follow_redirects=False)
    assert promoted.status_code == 303 and promoted.headers["location"] == f"/rollouts/{rollout_id}"
    assert _state(client, operator_headers, rollout_id)["stage"] == "fleet"
    for action in ("pause", "resume", "abort"):
        assert client.post(f"/rollouts/{rollout_id}/actions/{action}", headers=ORIGIN).status_code == 200
    assert _state(client, operator_headers, rollout_id)["state"] == "aborted"
    late = client.post(f"/rollouts/{rollout_id}/actions/resume", headers=ORIGIN, follow_redirects=False)
    assert late.status_code == 409

    assert client.post("/registry/m/1/deprecate", headers=ORIGIN, follow_redirects=False).status_code == 303
    assert client.get("/v1/models/m/versions/1", headers=operator_headers).json()["status"] == "deprecated"
    assert client.post(f"/devices/{device}/decommission", headers=ORIGIN, follow_redirects=False).status_code == 303
    assert client.get(f"/v1/devices/{device}", headers=operator_headers).json()["status"] == "decommissioned"
    for action in ("rollout.promote", "rollout.abort", "version.status", "device.decommission"):
        [entry] = audit_actions(engine, action)
        assert entry.actor == "token:test-admin" and entry.detail["via"] == "dashboard", action
    assert re.search(r'data-state="aborted"', client.get(f"/rollouts/{rollout_id}").text)


def test_a_recall_from_the_registry_page_shows_on_its_rollout(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    referenced_version(client, operator_headers, "m", "2", "b")
    device = enrolled_device(client, admin_headers, "kiosk-1")["device_id"]
    one_stage = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}
    client.post("/v1/rollouts", json={"model": "m", "version": "2", **one_stage}, headers=operator_headers)
    _report_active(engine, [device], "2")
    tick(engine)
    _sign_in(client, engine, Role.operator)
    assert client.post("/registry/m/2/recall", headers=ORIGIN, follow_redirects=False).status_code == 303
    recall = next(r for r in client.get("/v1/rollouts", headers=operator_headers).json()["data"] if r["recall_of"])
    assert recall["version"] == "1" and recall["recall_of"] == "2"
    page = client.get(f"/rollouts/{recall['id']}").text
    assert 'id="rollout-recall"' in page and "m@2" in page
    [entry] = audit_actions(engine, "version.recall")
    assert entry.actor == "token:test-operator" and entry.detail["rollout_id"] == recall["id"]


def test_dashboard_actions_are_audited_under_the_tokens_id(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    rollout_id, _ = _seed(client, admin_headers, operator_headers)  # admin_headers holds a "test-admin" too
    with Session(engine) as session:
        token, plaintext = auth.create_token(session, name="test-admin", role=Role.admin)
        session.commit()
        token_id = token.id
    client.cookies.clear()
    signed_in = client.post("/login", data={"token": plaintext, "next": "/"}, headers=ORIGIN, follow_redirects=False)
    assert signed_in.status_code == 303
    assert client.post(f"/rollouts/{rollout_id}/actions/pause", headers=ORIGIN).status_code == 200
    [entry] = audit_actions(engine, "rollout.pause")
    assert entry.actor == "token:test-admin" and entry.actor_id == token_id
