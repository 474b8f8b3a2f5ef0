"""Versions after upload: deprecate, recall (the control plane rolls devices off by itself), delete, GC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlmodel import Session

from control_plane.config import Settings
from control_plane.models import Rollout
from slmops.tinymodels.gguf_tiny import write_tiny_gguf
from tests.support.fleet import upload_version
from tests.support.lifecycle import NO_WAIT, audit_actions, desired_version, enrolled_device, referenced_version, tick
from tests.test_rollout_rules import _report_active

ONE_STAGE = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": NO_WAIT}


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """No grace period: a blob is garbage the moment nothing references it."""
    return Settings(data_dir=tmp_path / "data", database_url=db_url, fleet_enabled=False, blob_gc_grace_s=0)


def _roll_out(client, engine, op, version: str, devices: list[str], **extra: object) -> str:  # type: ignore[no-untyped-def]
    r = client.post("/v1/rollouts", json={"model": "m", "version": version, **ONE_STAGE, **extra}, headers=op)
    assert r.status_code == 201, r.text
    tick(engine)
    _report_active(engine, devices, version)
    tick(engine)
    assert client.get(f"/v1/rollouts/{r.json()['id']}", headers=op).json()["state"] == "completed"
    return str(r.json()["id"])


def test_a_deprecated_version_is_refused_as_a_rollout_target(client, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    enrolled_device(client, admin_headers, "d1")
    changed = client.patch("/v1/models/m/versions/1", json={"status": "deprecated"}, headers=operator_headers)
    assert changed.status_code == 200 and changed.json()["status"] == "deprecated"
    refused = client.post("/v1/rollouts", json={"model": "m", "version": "1", **ONE_STAGE}, headers=operator_headers)
    assert refused.status_code == 409 and refused.json()["code"] == "invalid_state"
    assert refused.json()["version_status"] == "deprecated"


def test_recall_rolls_every_device_off_the_version_by_itself(
    client, engine, admin_headers, operator_headers, viewer_headers
):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    for version, sha in (("1", "a"), ("2", "b"), ("3", "c")):
        referenced_version(client, operator_headers, "m", version, sha)
    devices = [enrolled_device(client, admin_headers, f"d{i}")["device_id"] for i in range(3)]
    _roll_out(client, engine, operator_headers, "1", devices)
    _roll_out(client, engine, operator_headers, "2", devices)
    client.patch("/v1/models/m/versions/3", json={"status": "deprecated"}, headers=operator_headers)
    viewer = client.patch("/v1/models/m/versions/2", json={"status": "recalled"}, headers=viewer_headers)
    assert viewer.status_code == 403

    recalled = client.patch("/v1/models/m/versions/2", json={"status": "recalled"}, headers=operator_headers)
    assert recalled.status_code == 200, recalled.text
    assert recalled.json()["status"] == "recalled"
    rollout_id = recalled.headers["location"].rsplit("/", 1)[1]
    rollout = client.get(f"/v1/rollouts/{rollout_id}", headers=viewer_headers).json()
    assert rollout["version"] == "1" and rollout["devices"] == {"assigned": 3}  # 3 is deprecated: not good
    assert rollout["created_by"] == "recall:token:test-operator" and rollout["recall_of"] == "2"
    assert [desired_version(engine, d) for d in devices] == ["1", "1", "1"]
    [entry] = audit_actions(engine, "version.recall")
    assert entry.target == "m@2" and entry.detail["rollout_id"] == rollout_id and entry.detail["devices"] == 3
    _report_active(engine, devices, "1")
    tick(engine)
    assert client.get(f"/v1/rollouts/{rollout_id}", headers=viewer_headers).json()["state"] == "completed"
    with Session(engine) as session:
        assert session.get(Rollout, rollout_id).plan["recall_of"] == "2"  # type: ignore[union-attr]

    late = enrolled_device(client, admin_headers, "late")["device_id"]
    tick(engine)
    assert desired_version(engine, late) == "1"  # never the recalled version, never via the recall
    again = client.post("/v1/rollouts", json={"model": "m", "version": "2", **ONE_STAGE}, headers=operator_headers)
    assert again.status_code == 409 and again.json()["code"] == "invalid_state"
    final = client.patch("/v1/models/m/versions/2", json={"status": "validated"}, headers=operator_headers)
    assert final.status_code == 409 and final.json()["code"] == "invalid_state"


def test_recall_rolls_back_a_running_rollout_of_the_version(client, engine, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    referenced_version(client, operator_headers, "m", "2", "b")
    devices = [enrolled_device(client, admin_headers, f"d{i}")["device_id"] for i in range(2)]
    _roll_out(client, engine, operator_headers, "1", devices)
    running = client.post("/v1/rollouts", json={"model": "m", "version": "2", **ONE_STAGE}, headers=operator_headers)
    assert [desired_version(engine, d) for d in devices] == ["2", "2"]
    recalled = client.patch("/v1/models/m/versions/2", json={"status": "recalled"}, headers=operator_headers)
    assert recalled.status_code == 200, recalled.text
    assert client.get(f"/v1/rollouts/{running.json()['id']}", headers=operator_headers).json()["state"] == "rolled_back"
    assert [desired_version(engine, d) for d in devices] == ["1", "1"]


def test_recall_without_a_good_version_is_refused(client, admin_headers, operator_headers):  # type: ignore[no-untyped-def]
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    referenced_version(client, operator_headers, "m", "1", "a")
    refused = client.patch("/v1/models/m/versions/1", json={"status": "recalled"}, headers=operator_headers)
    assert refused.status_code == 409 and refused.json()["code"] == "no_good_version"
    assert client.get("/v1/models/m/versions/1", headers=operator_headers).json()["status"] == "registered"


def _blob(settings: Settings, version: dict) -> Path:  # type: ignore[type-arg]
    return settings.blob_dir / "sha256" / version["artifacts"][0]["sha256"]


def test_delete_refuses_a_version_in_use_and_frees_only_unreferenced_blobs(  # type: ignore[no-untyped-def]
    client, engine, settings, admin_headers, operator_headers, tiny_gguf, tiny_gguf_other
):
    for name in ("m", "other"):
        client.post("/v1/models", json={"name": name}, headers=operator_headers)
    shared = upload_version(client, operator_headers, "m", "1", tiny_gguf)
    used = upload_version(client, operator_headers, "m", "2", tiny_gguf_other)
    upload_version(client, operator_headers, "other", "1", tiny_gguf)  # the same bytes: one blob, two references
    device = enrolled_device(client, admin_headers, "kiosk")["device_id"]
    client.post("/v1/rollouts", json={"model": "m", "version": "2", **ONE_STAGE}, headers=operator_headers)
    _report_active(engine, [device], "2")

    refused = client.delete("/v1/models/m/versions/2", headers=operator_headers)
    assert refused.status_code == 409 and refused.json()["code"] == "version_in_use"
    assert refused.json()["devices"] == ["kiosk"]
    assert _blob(settings, used).is_file()

    assert client.delete("/v1/models/m/versions/1", headers=operator_headers).status_code == 204
    assert _blob(settings, shared).is_file()  # still referenced by other@1
    assert client.get("/v1/models/m/versions/1", headers=operator_headers).json()["status"] == "deleted"
    missing = client.get(f"/v1/artifacts/{shared['artifacts'][0]['sha256']}", headers=operator_headers)
    assert missing.status_code == 200  # other@1 still serves the same bytes
    assert client.delete("/v1/models/other/versions/1", headers=operator_headers).status_code == 204
    assert not _blob(settings, shared).exists()
    assert [e.target for e in audit_actions(engine, "version.delete")] == ["m@1", "other@1"]
    viewer_gone = client.delete("/v1/models/m/versions/1", headers=operator_headers)
    assert viewer_gone.status_code == 404 and viewer_gone.json()["code"] == "version_not_found"


def test_gc_applies_retention_and_frees_exactly_the_unreferenced_blobs(  # type: ignore[no-untyped-def]
    client, engine, settings, tmp_path, admin_headers, operator_headers
):
    client.post("/v1/models", json={"name": "m", "keep_versions": 1}, headers=operator_headers)
    files = {v: write_tiny_gguf(tmp_path / f"v{v}.gguf", seed=10 + int(v)) for v in ("1", "2", "3")}
    uploaded = {"1": upload_version(client, operator_headers, "m", "1", files["1"])}
    device = enrolled_device(client, admin_headers, "kiosk")["device_id"]
    client.post("/v1/rollouts", json={"model": "m", "version": "1", **ONE_STAGE}, headers=operator_headers)
    uploaded |= {v: upload_version(client, operator_headers, "m", v, files[v]) for v in ("2", "3")}
    orphan = settings.blob_dir / "sha256" / ("f" * 64)
    orphan.write_bytes(b"left by a crash" * 100)
    assert device

    dry = client.post("/v1/models/gc", params={"dry_run": True}, headers=admin_headers)
    assert dry.status_code == 200, dry.text
    expected_blobs = {uploaded["2"]["artifacts"][0]["sha256"], "f" * 64}
    expected_bytes = _blob(settings, uploaded["2"]).stat().st_size + orphan.stat().st_size
    assert dry.json()["versions"] == ["m@2"]  # 3 is the newest kept; 1 is meant to run on a device
    assert {b["sha256"] for b in dry.json()["blobs"]} == expected_blobs
    assert dry.json()["bytes_freed"] == expected_bytes
    assert _blob(settings, uploaded["2"]).is_file() and orphan.is_file()  # a dry run removes nothing
    assert client.post("/v1/models/gc", headers=operator_headers).status_code == 403

    done = client.post("/v1/models/gc", headers=admin_headers).json()
    assert done["bytes_freed"] == expected_bytes and done["versions"] == ["m@2"]
    assert not _blob(settings, uploaded["2"]).exists() and not orphan.exists()
    assert _blob(settings, uploaded["1"]).is_file() and _blob(settings, uploaded["3"]).is_file()
    statuses = {
        v["version"]: v["status"] for v in client.get("/v1/models/m/versions", headers=operator_headers).json()["data"]
    }
    assert statuses == {"1": "registered", "2": "deleted", "3": "registered"}
    assert client.post("/v1/models/gc", params={"dry_run": True}, headers=admin_headers).json()["bytes_freed"] == 0


def test_gc_keeps_a_blob_younger_than_the_grace_period(client, tmp_path, db_url, engine, admin_headers):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from control_plane.api.main import create_app

    graced = Settings(data_dir=tmp_path / "graced", database_url=db_url, fleet_enabled=False, blob_gc_grace_s=600)
    with TestClient(create_app(graced, engine=engine)) as other:
        young = graced.blob_dir / "sha256" / ("e" * 64)
        young.parent.mkdir(parents=True, exist_ok=True)
        young.write_bytes(b"being adopted")
        old = graced.blob_dir / "sha256" / ("d" * 64)
        old.write_bytes(b"long forgotten")
        os.utime(old, (1, 1))
        result = other.post("/v1/models/gc", headers=admin_headers).json()
    assert [b["sha256"] for b in result["blobs"]] == ["d" * 64]
    assert young.is_file() and not old.exists()
