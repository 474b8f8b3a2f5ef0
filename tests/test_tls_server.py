"""`slmops server --tls-cert/--tls-key`: https with HSTS, an https public URL, clear errors."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from control_plane.config import Settings
from shared.net import free_port
from tests.support.tls import TestCA


@contextmanager
def _server(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    clean.update({"SLMOPS_FLEET_ENABLED": "false", **(env or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops", "server", *args],
        cwd=cwd,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, **client: object) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2, **client)  # type: ignore[arg-type]
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


def test_server_serves_https_with_hsts(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server")
    port = free_port()
    args = ("--port", str(port), "--tls-cert", str(server.cert_file), "--tls-key", str(server.key_file))
    with _server(tmp_path, *args) as proc:
        response = _wait_ready(proc, f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=ca.ca_file))
        assert response.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.TransportError):  # no plaintext on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted by default
            httpx.get(f"https://127.0.0.1:{port}/readyz", timeout=5)


def test_plain_http_has_no_hsts_but_a_tls_proxy_gets_it(tmp_path: Path) -> None:
    port = free_port()
    with _server(tmp_path, "--port", str(port)) as proc:
        response = _wait_ready(proc, f"http://127.0.0.1:{port}")
        assert "strict-transport-security" not in response.headers
        # A TLS-terminating proxy on loopback (trusted by --forwarded-allow-ips' default) says https.
        proxied = httpx.get(f"http://127.0.0.1:{port}/readyz", headers={"X-Forwarded-Proto": "https"})
        assert proxied.headers["strict-transport-security"].startswith("max-age=")


def test_public_url_defaults_to_https_with_tls(tmp_path: Path) -> None:
    settings = Settings(tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem", port=8443)  # type: ignore[call-arg]
    assert settings.base_url == "https://127.0.0.1:8443"
    assert Settings(port=8080).base_url == "http://127.0.0.1:8080"  # type: ignore[call-arg]


def test_certificate_without_key_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env["SLMOPS_TLS_CERT_FILE"] = str(tmp_path / "cert.pem")
    result = subprocess.run(
        [sys.executable, "-m", "slmops", "db", "current"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "SLMOPS_TLS" in result.stderr and "both" in result.stderr
