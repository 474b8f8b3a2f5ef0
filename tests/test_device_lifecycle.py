"""Devices after enrollment: rename and relabel one, relabel many by selector, and what rollouts make of it."""

from __future__ import annotations

from sqlmodel import Session, select

from control_plane.models import RolloutDevice
from tests.support.lifecycle import NO_WAIT, audit_actions, desired_version, enrolled_device, referenced_version, tick
from tests.test_rollout_rules import _report_active


def test_patch_renames_and_relabels_a_device(client, engine, admin_headers, operator_headers, viewer_headers):  # type: ignore[no-untyped-def]
    device = enrolled_device(client, admin_headers, "kiosk-1", tier="main", region="eu")["device_id"]
    other = enrolled_device(client, admin_headers, "kiosk-2")["device_id"]
    changed = client.patch(
        f"/v1/devices/{device}", json={"name": "kiosk-one", "labels": {"tier": "canary"}}, headers=operator_headers
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "kiosk-one" and changed.json()["labels"] == {"tier": "canary"}
    found = client.get("/v1/devices", params={"selector": "tier=canary"}, headers=viewer_headers).json()["data"]
    assert [d["id"] for d in found] == [device]
    assert client.get("/v1/devices", params={"selector": "region=eu"}, headers=viewer_headers).json()["data"] == []
    [entry] = audit_actions(engine, "device.update")
    assert entry.target == device and entry.detail["labels_before"] == {"tier": "main", "region": "eu"}
    assert entry.actor == "token:test-operator"

    taken = client.patch(f"/v1/devices/{other}", json={"name": "kiosk-one"}, headers=operator_headers)
    assert taken.status_code == 409 and taken.json()["code"] == "device_exists"
    zoned = client.patch(f"/v1/devices/{other}", json={"labels": {"tz": "Europe/Stockholm"}}, headers=operator_headers)
    assert zoned.status_code == 200, zoned.text  # timezone labels hold "/" (and "+": Etc/GMT+1)
    found = client.get("/v1/devices", params={"selector": "tz=Europe/Stockholm"}, headers=viewer_headers).json()
    assert [d["id"] for d in found["data"]] == [other]
    bad = client.patch(f"/v1/devices/{other}", json={"labels": {"tier": "a b"}}, headers=operator_headers)
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
    viewer = client.patch(f"/v1/devices/{other}", json={"labels": {}}, headers=viewer_headers)
    assert viewer.status_code == 403 and viewer.json()["code"] == "forbidden"
    missing = client.patch("/v1/devices/nope", json={"labels": {}}, headers=operator_headers)
    assert missing.status_code == 404 and missing.json()["code"] == "device_not_found"


def test_bulk_relabel_says_how_many_matched_and_is_audited(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    for i in range(5):
        enrolled_device(client, admin_headers, f"d{i}", region="eu" if i < 3 else "us", tier="main", old="x")
    result = client.post(
        "/v1/devices/relabel",
        json={"selector": "region=eu", "set": {"tier": "canary"}, "remove": ["old"]},
        headers=operator_headers,
    )
    assert result.status_code == 200, result.text
    assert result.json()["matched"] == 3
    canary = client.get("/v1/devices", params={"selector": "tier=canary"}, headers=operator_headers).json()["data"]
    assert sorted(d["name"] for d in canary) == ["d0", "d1", "d2"]
    assert all(d["labels"] == {"region": "eu", "tier": "canary"} for d in canary)
    untouched = client.get("/v1/devices", params={"selector": "old"}, headers=operator_headers).json()["data"]
    assert sorted(d["name"] for d in untouched) == ["d3", "d4"]
    [entry] = audit_actions(engine, "device.relabel")
    assert entry.target == "region=eu" and entry.detail["matched"] == 3

    none = client.post(
        "/v1/devices/relabel", json={"selector": "region=mars", "set": {"a": "b"}}, headers=operator_headers
    )
    assert none.status_code == 200 and none.json()["matched"] == 0
    unbounded = client.post("/v1/devices/relabel", json={"selector": "", "set": {"a": "b"}}, headers=operator_headers)
    assert unbounded.status_code == 422 and unbounded.json()["code"] == "validation_error"


def test_relabel_moves_a_device_into_a_running_rollout_as_a_newcomer(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    referenced_version(client, operator_headers, "m", "2", "b")
    canary = enrolled_device(client, admin_headers, "canary", tier="canary")["device_id"]
    moved = enrolled_device(client, admin_headers, "moved", tier="main")["device_id"]
    one_stage = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}
    first = client.post("/v1/rollouts", json={"model": "m", "version": "1", **one_stage}, headers=operator_headers)
    tick(engine)
    _report_active(engine, [canary, moved], "1")
    tick(engine)
    assert client.get(f"/v1/rollouts/{first.json()['id']}", headers=operator_headers).json()["state"] == "completed"

    spec = {"model": "m", "version": "2", "selector": "tier=canary", **one_stage}
    second = client.post("/v1/rollouts", json=spec, headers=operator_headers).json()
    assert second["devices"] == {"assigned": 1}
    relabel = client.post(
        "/v1/devices/relabel", json={"selector": "tier=main", "set": {"tier": "canary"}}, headers=operator_headers
    )
    assert relabel.json()["matched"] == 1
    tick(engine)
    # A newcomer keeps the stable version while the rollout runs: it was never part of the stages.
    assert desired_version(engine, moved) == "1"
    _report_active(engine, [canary], "2")
    tick(engine)
    assert client.get(f"/v1/rollouts/{second['id']}", headers=operator_headers).json()["state"] == "completed"
    # ... and the rollout's version once it completed.
    assert desired_version(engine, moved) == "2"
    with Session(engine) as session:
        members = session.exec(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == second["id"])).all()
    assert list(members) == [canary]


def test_bulk_relabel_cannot_take_a_device_over_the_label_cap(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    full = enrolled_device(client, admin_headers, "full", fleet="a", **{f"k{i}": "v" for i in range(60)})
    enrolled_device(client, admin_headers, "light", fleet="a")
    many = {f"n{i}": "v" for i in range(10)}
    over = client.post("/v1/devices/relabel", json={"selector": "fleet=a", "set": many}, headers=operator_headers)
    assert over.status_code == 422 and over.json()["code"] == "too_many_labels", over.text
    assert over.json()["devices"] == [full["device_id"]]
    devices = client.get("/v1/devices", params={"selector": "fleet=a"}, headers=operator_headers).json()["data"]
    assert sorted(len(d["labels"]) for d in devices) == [1, 61]  # nothing changed on any device
    assert audit_actions(engine, "device.relabel") == []
    # Replacing and removing labels it has keeps a full device within the cap.
    swap = {"selector": "fleet=a", "set": {"k0": "w", "n0": "v"}, "remove": ["k1"]}
    assert client.post("/v1/devices/relabel", json=swap, headers=operator_headers).status_code == 200
