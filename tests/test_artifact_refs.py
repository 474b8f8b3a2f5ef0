"""Artifact references are checked before anyone is sent to them; devices download only what they are assigned."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.config import Settings
from control_plane.models import Artifact, RolloutDevice
from tests.support.assign import assign_version

REFUSED = [
    "https://127.0.0.1:5432/",
    "https://169.254.169.254/latest/meta-data/",
    "https://user:secret@models.example/m.gguf",
    "https://localhost/m.gguf",
    "https://[::1]/m.gguf",
    "https://10.1.2.3/m.gguf",
    "s3://models/tinyllama/m.gguf",
]


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        max_upload_bytes=20 * 1024 * 1024,
        fleet_enabled=False,
        artifact_reference_allowed_hosts="mirror.lan,192.168.7.0/24",  # as SLMOPS_... reads it
    )


def _reference(url: str, sha_char: str = "a") -> dict[str, Any]:
    return {"url": url, "sha256": sha_char * 64, "size_bytes": 1234, "format": "gguf"}


def _model(client: TestClient, operator: dict[str, str], name: str = "m") -> None:
    assert client.post("/v1/models", json={"name": name}, headers=operator).status_code == 201


def test_unsafe_references_are_refused_and_nothing_is_stored(client, operator_headers, viewer_headers, engine):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    for url in REFUSED:
        created = client.post(
            "/v1/models/m/versions", json={"version": "1", "artifact": _reference(url)}, headers=operator_headers
        )
        assert created.status_code == 422 and created.json()["code"] == "invalid_reference", (url, created.text)
        assert client.get("/v1/models/m/versions/1", headers=viewer_headers).status_code == 404
    s3 = client.post(
        "/v1/models/m/versions", json={"version": "1", "artifact": _reference(REFUSED[-1])}, headers=operator_headers
    )
    assert "s3:// references are not supported yet" in s3.json()["detail"]

    ok = client.post(
        "/v1/models/m/versions",
        json={"version": "1", "artifact": _reference("https://models.example/m.gguf")},
        headers=operator_headers,
    )
    assert ok.status_code == 201, ok.text
    for index, url in enumerate(REFUSED):  # the other route that takes a reference
        added = client.post(
            "/v1/models/m/versions/1/artifacts", json=_reference(url, "0123456"[index]), headers=operator_headers
        )
        assert added.status_code == 422 and added.json()["code"] == "invalid_reference", url
    with Session(engine) as session:
        urls = [a.external_url for a in session.exec(select(Artifact)).all()]
    assert urls == ["https://models.example/m.gguf"]


def test_the_allow_list_setting_admits_private_mirrors(client, operator_headers):  # type: ignore[no-untyped-def]
    _model(client, operator_headers)
    for version, url in [("1", "https://mirror.lan/m.gguf"), ("2", "https://192.168.7.20:8443/m.gguf")]:
        body = {"version": version, "artifact": _reference(url, version)}
        created = client.post("/v1/models/m/versions", json=body, headers=operator_headers)
        assert created.status_code == 201, created.text
    outside = {"version": "3", "artifact": _reference("https://192.168.8.20/m.gguf", "3")}
    assert client.post("/v1/models/m/versions", json=outside, headers=operator_headers).json()["code"] == (
        "invalid_reference"
    )


@pytest.mark.parametrize(
    "stored",
    ["https://169.254.169.254/latest/meta-data/", "https://reader:s3cr3t@models.example/m.gguf"],
)
def test_a_reference_stored_before_the_rules_is_not_shown_or_redirected_to(  # type: ignore[no-untyped-def]
    client, operator_headers, viewer_headers, engine, stored
):
    _model(client, operator_headers)
    good = {"version": "1", "artifact": _reference("https://models.example/m.gguf")}
    assert client.post("/v1/models/m/versions", json=good, headers=operator_headers).status_code == 201
    with Session(engine) as session:  # as an older control plane accepted it
        artifact = session.exec(select(Artifact)).one()
        artifact.external_url = stored
        session.add(artifact)
        session.commit()
    shown = client.get("/v1/models/m/versions/1", headers=viewer_headers)
    assert shown.status_code == 200 and "s3cr3t" not in shown.text  # credentials are dropped
    download = client.get(f"/v1/artifacts/{'a' * 64}", headers=viewer_headers, follow_redirects=False)
    assert download.status_code == 422 and download.json()["code"] == "invalid_reference"
    assert "s3cr3t" not in download.text


# -- downloads by device credential ---------------------------------------------------------------


def _device(client: TestClient, admin: dict[str, str], name: str) -> tuple[str, dict[str, str]]:
    created = client.post("/v1/devices", json={"name": name}, headers=admin).json()
    enrolled = client.post(
        "/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"], "hardware": {"ram_mb": 4096}}
    ).json()
    basic = base64.b64encode(f"{enrolled['device_id']}:{enrolled['device_secret']}".encode()).decode()
    return enrolled["device_id"], {"Authorization": f"Basic {basic}"}


def _upload(client: TestClient, operator: dict[str, str], path: Path, version: str) -> str:
    with path.open("rb") as fh:
        up = client.post(
            "/v1/models/m/versions", data={"version": version}, files={"file": ("m.gguf", fh)}, headers=operator
        )
    assert up.status_code == 201, up.text
    return str(up.json()["artifacts"][0]["sha256"])


def _fetch(client: TestClient, sha: str, headers: dict[str, str]) -> int:
    return client.get(f"/v1/artifacts/{sha}", headers=headers).status_code


def test_a_device_downloads_only_artifacts_of_versions_assigned_to_it(  # type: ignore[no-untyped-def]
    client, admin_headers, operator_headers, viewer_headers, engine, tiny_gguf, tiny_gguf_other
):
    _model(client, operator_headers)
    v1, v2 = _upload(client, operator_headers, tiny_gguf, "1"), _upload(client, operator_headers, tiny_gguf_other, "2")
    device, device_headers = _device(client, admin_headers, "edge-a")
    other, other_headers = _device(client, admin_headers, "edge-b")

    # Nothing assigned yet: the same answer as for an artifact that does not exist.
    refused = client.get(f"/v1/artifacts/{v1}", headers=device_headers)
    assert refused.status_code == 404 and refused.json()["code"] == "artifact_not_found"
    assert _fetch(client, v1, viewer_headers) == 200  # operators' tokens fetch anything

    assign_version(engine, device, model="m", version="1")
    assert _fetch(client, v1, device_headers) == 200
    assert _fetch(client, v2, device_headers) == 404
    assert _fetch(client, v1, other_headers) == 404  # another device's assignment is not this one's

    # A rollout moves the device to 2: it may still fetch 1, which a rollback restores.
    previous = assign_version(engine, device, model="m", version="1")
    with Session(engine) as session:
        session.add(RolloutDevice(rollout_id="r-1", device_id=device, order_key="k", status="assigned",
                                  artifact_sha256=v2, previous_desired=previous))  # fmt: skip
        session.commit()
    assign_version(engine, device, model="m", version="2", rollout_id="r-1")
    assert _fetch(client, v2, device_headers) == 200
    assert _fetch(client, v1, device_headers) == 200
    assert _fetch(client, v2, other_headers) == 404

    # An adapter named by the desired state is the device's too.
    assign_version(engine, other, model="m", version="1", adapter_sha256=v2)
    assert _fetch(client, v2, other_headers) == 200 and _fetch(client, v1, other_headers) == 200


PRESIGNED = "https://bucket.s3.amazonaws.com/m.gguf?X-Amz-Credential=AKIAXX&X-Amz-Signature=s3cr3tsig"


def test_a_presigned_references_secrets_are_not_shown_or_audited(  # type: ignore[no-untyped-def]
    client, admin_headers, operator_headers, viewer_headers, engine
):
    _model(client, operator_headers)
    created = client.post(
        "/v1/models/m/versions", json={"version": "1", "artifact": _reference(PRESIGNED)}, headers=operator_headers
    )
    assert created.status_code == 201, created.text
    more = client.post("/v1/models/m/versions/1/artifacts", json=_reference(PRESIGNED + "&v=2", "b"),
                       headers=operator_headers)  # fmt: skip
    assert more.status_code == 201, more.text
    for shown in (created, more, client.get("/v1/models/m/versions/1", headers=viewer_headers)):
        assert "s3cr3tsig" not in shown.text and "AKIAXX" not in shown.text, shown.text
    audit = client.get("/v1/audit", headers=admin_headers)
    assert audit.status_code == 200 and "version.create" in audit.text, audit.text
    assert "s3cr3tsig" not in audit.text and "AKIAXX" not in audit.text
    with Session(engine) as session:
        assert session.exec(select(Artifact).where(Artifact.sha256 == "a" * 64)).one().external_url == PRESIGNED
    # A device still gets the whole URL: the download redirects to it.
    download = client.get(f"/v1/artifacts/{'a' * 64}", headers=viewer_headers, follow_redirects=False)
    assert download.status_code == 307 and download.headers["location"] == PRESIGNED
