"""Helpers for rollout tests: uploads, enrolled devices, a demo fleet on the shared Mosquitto.

Simulated devices and their telemetry pumps are in `tests.support.simulated`."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from rich.console import Console

from slmops.demo import Fleet


def upload_version(client: TestClient, headers: dict[str, str], model: str, version: str, path: Path) -> dict:  # type: ignore[type-arg]
    with path.open("rb") as fh:
        response = client.post(
            f"/v1/models/{model}/versions", data={"version": version}, files={"file": (path.name, fh)}, headers=headers
        )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def enroll_devices(
    client: TestClient, admin: dict[str, str], names_labels: list[tuple[str, dict[str, str]]]
) -> list[dict]:  # type: ignore[type-arg]
    creds = []
    for name, labels in names_labels:
        created = client.post("/v1/devices", json={"name": name, "labels": labels}, headers=admin)
        assert created.status_code == 201, created.text
        hardware = {"cpu_model": "sim", "cpu_cores": 4, "ram_mb": 4096, "arch": "x86_64"}
        enrolled = client.post(
            "/v1/devices/enroll", json={"enrollment_token": created.json()["enrollment_token"], "hardware": hardware}
        )
        assert enrolled.status_code == 201, enrolled.text
        creds.append(enrolled.json())
    return creds


def mosquitto_fleet(workdir: Path) -> Fleet:
    """A demo fleet (real control plane and agent processes) on the shared Mosquitto, under a
    topic prefix of its own."""
    return Fleet(
        workdir=workdir,
        console=Console(quiet=True),
        mqtt_url="mqtt://127.0.0.1:1883",
        topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
    )
