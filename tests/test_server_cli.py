"""`slmops server` starts with no configuration at all and serves its OpenAPI docs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from shared.net import free_port


def test_server_starts_with_no_configuration(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops", "server", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        assert (tmp_path / ".slmops" / "slmops.db").is_file()
        assert httpx.get(f"{base}/docs").status_code == 200
        paths = httpx.get(f"{base}/openapi.json").json()["paths"]
        for path in (
            "/v1/models",
            "/v1/models/{name}/versions",
            "/v1/artifacts/{sha256}",
            "/v1/devices/enroll",
        ):
            assert path in paths
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_invalid_settings_are_reported_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "SLMOPS_DATABASE_URL": "mysql://nope", "SLMOPS_PORT": "99999"}
    result = subprocess.run(
        [sys.executable, "-m", "slmops", "db", "current"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "SLMOPS_DATABASE_URL" in result.stderr and "SLMOPS_PORT" in result.stderr
