"""Helpers for rollout tests: a control plane with its fleet runtime, devices, telemetry pumps."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rich.console import Console

from shared.topics import Topics
from slmops.demo import Fleet
from slmops.simulator import SimBehaviour, SimDevice


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


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


class TelemetryPump:
    """Publishes a telemetry window from every running simulated device every `interval_s`."""

    def __init__(self, devices: list[SimDevice], interval_s: float = 0.2) -> None:
        self.devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TelemetryPump:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for device in self.devices:
                if device.client.connected:
                    device.publish_telemetry()


def start_sim_devices(url: str, topics: Topics, creds: list[dict], behaviour: SimBehaviour) -> list[SimDevice]:  # type: ignore[type-arg]
    devices = [SimDevice(url, topics, c["device_id"], c["device_secret"], behaviour) for c in creds]
    for device in devices:
        device.start()
    return devices


def mosquitto_fleet(workdir: Path) -> Fleet:
    """A demo fleet (real control plane and agent processes) on the shared Mosquitto, under a
    topic prefix of its own."""
    return Fleet(
        workdir=workdir,
        console=Console(quiet=True),
        mqtt_url="mqtt://127.0.0.1:1883",
        topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
    )
