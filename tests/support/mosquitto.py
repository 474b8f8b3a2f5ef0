"""A private Mosquitto process with credentials and the device ACL, for tests and benchmarks.

The system broker at 127.0.0.1:1883 is anonymous with no ACL; isolation and outage tests need
their own broker they can configure, stop and restart.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from control_plane.fleet.credentials import MosquittoPasswordFile
from control_plane.fleet.mosquitto_config import CONTROL_PLANE_USER, render_acl, render_config
from shared.mqtt.errors import MqttError
from shared.net import free_port
from shared.topics import Topics


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class MosquittoProcess:
    """`start()`, `stop()`, `restart()` (same port, so clients reconnect) and `credentials`."""

    def __init__(
        self,
        workdir: Path,
        *,
        topics: Topics,
        admin_secret: str = "control-plane-secret",
        port: int | None = None,
        config: str | None = None,
    ) -> None:
        """`config`: a mosquitto.conf to use instead of the rendered one (it must use `port`)."""
        self.workdir = workdir
        self.topics = topics
        self.port = port or free_port()
        self.admin_user = CONTROL_PLANE_USER
        self.admin_secret = admin_secret
        self.pid_file = workdir / "mosquitto.pid"
        self.config_file = workdir / "mosquitto.conf"
        self.credentials = MosquittoPasswordFile(
            workdir / "passwd", admins={CONTROL_PLANE_USER: admin_secret}, pid_file=self.pid_file
        )
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, username: str | None = None, password: str | None = None) -> str:
        auth = f"{username}:{password}@" if username is not None else ""
        return f"mqtt://{auth}127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return self.url(self.admin_user, self.admin_secret)

    def start(self, devices: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise MqttError("mosquitto is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "acl").write_text(render_acl(self.topics, [self.admin_user]))
        if not self.credentials.path.exists() or devices is not None:
            self.credentials.sync({})
        for device_id, secret in (devices or {}).items():
            self.credentials.add_device(device_id, secret)
        self.config_file.write_text(
            self._config
            or render_config(
                port=self.port,
                password_file=self.credentials.path,
                acl_file=self.workdir / "acl",
                pid_file=self.pid_file,
                # Sessions and retained messages survive restart(), as in production.
                persistence_dir=self.workdir,
                run_as_user=getpass.getuser() if os.geteuid() == 0 else None,
            )
        )
        self._process = subprocess.Popen(
            [binary, "-c", str(self.config_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_listening(timeout_s)

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise MqttError(f"mosquitto exited with {self._process.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if self.pid_file.exists():
                return
        raise MqttError(f"mosquitto did not listen on {self.port} within {timeout_s}s")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is None:
            return
        terminate(self._process)
        if self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None
        self.pid_file.unlink(missing_ok=True)


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if the process has not ended within `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
