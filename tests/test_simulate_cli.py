"""`slmops simulate` as an operator runs it: against a `slmops server` process and the real Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.net import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.mosquitto
SLMOPS = str(Path(sys.executable).with_name("slmops"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    env = os.environ | {
        "SLMOPS_DATA_DIR": str(tmp_path / "data"),
        "SLMOPS_DATABASE_URL": f"sqlite:///{tmp_path / 'cp.db'}",
        "SLMOPS_MQTT_URL": "mqtt://127.0.0.1:1883",
        "SLMOPS_MQTT_TOPIC_PREFIX": f"slmops-test/{uuid.uuid4().hex[:10]}",
        "SLMOPS_MQTT_CLIENT_ID": f"cp-{uuid.uuid4().hex[:8]}",
        "SLMOPS_PORT": str(port),
    }
    token = subprocess.run([SLMOPS, "token", "create"], env=env, check=True, capture_output=True, text=True).stdout
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([SLMOPS, "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, token.strip()
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _simulate(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [SLMOPS, "simulate", "--control-plane", url, "--token", token, "--duration", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_simulate_enrolls_connects_and_reuses_its_credentials(server, tmp_path):  # type: ignore[no-untyped-def]
    url, token = server
    creds = tmp_path / "creds.json"
    first = _simulate(url, token, "-n", "5", "--credentials", str(creds), "--telemetry-interval", "0.2")
    assert first.returncode == 0, first.stderr
    assert "connected 5/5" in first.stderr
    assert len(json.loads(creds.read_text())) == 5
    headers = {"Authorization": f"Bearer {token}"}
    devices = httpx.get(f"{url}/v1/devices", headers=headers).json()["data"]
    assert len(devices) == 5
    assert all(d["hardware"]["cpu_model"] == "sim" and d["last_seen"] for d in devices)
    # A clean stop leaves every device offline (retained status "shutdown"), once ingested.
    wait_for(
        lambda: all(d["status"] == "offline" for d in httpx.get(f"{url}/v1/devices", headers=headers).json()["data"]),
        what="devices offline",
    )

    again = _simulate(url, token, "-n", "3", "--credentials", str(creds))
    assert again.returncode == 0, again.stderr
    assert "connected 3/3" in again.stderr
    assert len(httpx.get(f"{url}/v1/devices", headers=headers).json()["data"]) == 5  # no new devices


def test_simulate_without_a_token_says_what_to_do(tmp_path):  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if k != "SLMOPS_TOKEN"}
    result = subprocess.run([SLMOPS, "simulate", "-n", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "--token" in result.stderr
