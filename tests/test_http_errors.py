"""A client's malformed request is a 4xx problem+json with a stable code, never a 500."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.support.telemetry import add_devices


def _model(client: TestClient, headers: dict[str, str]) -> None:
    assert client.post("/v1/models", json={"name": "m"}, headers=headers).status_code == 201


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=x", b"garbage"),  # curl -d garbage with a multipart type
        ("multipart/form-data; boundary=x", b"--x\r\n" + b"A" * 20000 + b": v\r\n\r\n"),  # a part header too long
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="notes"\r\n\r\n\xff\xfe\r\n--x--\r\n',
        ),
        ("application/x-www-form-urlencoded", b"garbage"),  # curl -d garbage
    ],
)
def test_a_malformed_upload_is_a_422(  # type: ignore[no-untyped-def]
    client: TestClient, operator_headers, content_type: str, body: bytes
) -> None:
    _model(client, operator_headers)
    response = client.post(
        "/v1/models/m/versions", content=body, headers={**operator_headers, "Content-Type": content_type}
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize("path", ["/v1/models/m/versions", "/v1/models/m/versions/1.0.0/artifacts"])
@pytest.mark.parametrize("body", [b"\x80", b"\x00", b"{"])  # not UTF-8, not JSON (schemathesis found the first)
def test_a_reference_body_that_is_not_json_is_a_422(  # type: ignore[no-untyped-def]
    client: TestClient, operator_headers, path: str, body: bytes
) -> None:
    _model(client, operator_headers)
    response = client.post(path, content=body, headers={**operator_headers, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    "query",
    [
        {"end": "0001-01-01T00:00:00Z"},
        {"start": "0001-01-01T00:00:00Z", "end": "0001-01-01T01:00:00Z"},
        {"end": "9999-12-31T23:59:59Z"},
        {"step": "999999999h"},
        {"step": "9" * 400},
    ],
)
def test_telemetry_ranges_outside_the_calendar_are_a_422(  # type: ignore[no-untyped-def]
    client: TestClient, viewer_headers, engine: sa.Engine, query: dict[str, str]
) -> None:
    (device_id,) = add_devices(engine, "dev-1")
    for path, extra in (
        (f"/v1/telemetry/devices/{device_id}", {}),
        ("/v1/telemetry/versions", {"model": "m", "version": "1"}),
    ):
        response = client.get(path, params={**query, **extra}, headers=viewer_headers)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    "labels",
    [{"k" * 64: "v"}, {"region": "v" * 64}, {"bad key": "v"}, {"region": "a,b=c"}, {f"k{i}": "v" for i in range(65)}],
)
def test_labels_the_registry_cannot_hold_or_select_are_a_422(  # type: ignore[no-untyped-def]
    client: TestClient, admin_headers, labels: dict[str, Any]
) -> None:
    response = client.post("/v1/devices", json={"name": "d1", "labels": labels}, headers=admin_headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert client.get("/v1/devices", headers=admin_headers).json()["data"] == []  # nothing half-created


def test_every_schema_the_openapi_document_names_is_defined(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    defined = set(document["components"]["schemas"])

    def refs(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
            return found.union(*(refs(value) for value in node.values()))
        if isinstance(node, list):
            return set().union(*(refs(value) for value in node))
        return set()

    named = {ref.removeprefix("#/components/schemas/") for ref in refs(document)}
    assert named - defined == set()
    assert {"VersionByReference", "ArtifactReference", "Problem"} <= named
