"""HAProxy (Debian's package) in front of control-plane replicas, from deploy/haproxy/haproxy.cfg.

The shipped file reads its addresses from the environment, so a test runs that very file with
free loopback ports of its own; `.ci/run` installs the package.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from shared.net import free_port
from tests.support.waiting import wait_for

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not found:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    return str(found)


class HAProxy:
    """One haproxy process balancing `replicas` (host:port each, two as in the shipped file)."""

    def __init__(self, workdir: Path, replicas: list[str]) -> None:
        assert len(replicas) == 2, "deploy/haproxy/haproxy.cfg names two replicas"
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "haproxy.log"
        self.env = {
            **os.environ,
            "SLMOPS_LB_BIND": f"127.0.0.1:{self.port}",
            "SLMOPS_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "SLMOPS_REPLICA_1": replicas[0],
            "SLMOPS_REPLICA_2": replicas[1],
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([haproxy_binary(), "-c", "-f", str(CONFIG)], env=self.env, capture_output=True, text=True)

    def start(self) -> HAProxy:
        with self.log.open("ab") as log:  # -db: foreground, no daemon; -W: master-worker
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-W", "-db", "-f", str(CONFIG)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self._listening, timeout_s=15, what="haproxy listening")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stats(self) -> dict[str, dict[str, str]]:
        """The control_plane backend's rows of HAProxy's CSV statistics, by server name ("BACKEND" too)."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=2).text.lstrip("# ")
        return {r["svname"]: r for r in csv.DictReader(io.StringIO(text)) if r["pxname"] == "control_plane"}

    def server_states(self) -> dict[str, str]:
        """Each replica's health as HAProxy sees it: "UP", "DOWN", "UP 1/2"..."""
        return {name: row["status"] for name, row in self.stats().items() if name.startswith("replica")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
