"""A private NATS cluster on loopback: N `nats-server` processes with JetStream and MQTT listeners.

Each node gets free client, cluster, MQTT and monitoring ports, its own JetStream store and a
config that includes one shared users file (`users`, a `NatsUsersFile`), as deploy/nats/ lays out.
`kill(i)` is kill -9; `wait_ready()` waits until JetStream has a meta leader again, which is when
the surviving nodes accept MQTT connections (about 10-15 s after a node dies).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from control_plane.fleet.mosquitto_config import CONTROL_PLANE_USER
from control_plane.fleet.nats_users import NatsUsersFile
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import MqttError
from shared.net import free_port
from shared.topics import Topics
from tests.support.mosquitto import terminate

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def nats_available() -> bool:
    return Path(NATS_SERVER).exists()


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """`start()`, `kill(i)` (SIGKILL), `restart(i)`, `stop()`; MQTT URLs per node or all of them."""

    def __init__(
        self,
        workdir: Path,
        *,
        topics: Topics,
        size: int = 3,
        admin_secret: str = "control-plane-secret",
        mqtt_options: str = "",
    ) -> None:
        """`mqtt_options`: more lines for each node's `mqtt` block (e.g. `consumer_replicas: 1`)."""
        self.workdir = workdir
        self.mqtt_options = mqtt_options
        self.topics = topics
        self.admin_user = CONTROL_PLANE_USER
        self.admin_secret = admin_secret
        self.nodes = [NatsNode(f"n{i + 1}", free_port(), free_port(), free_port(), free_port()) for i in range(size)]
        self.users = NatsUsersFile(
            workdir / "users.conf",
            topics=topics,
            admins={CONTROL_PLANE_USER: admin_secret},
            reload=self.reload,
        )

    # -- URLs ---------------------------------------------------------------------------------

    def url(self, index: int, username: str | None = None, password: str | None = None) -> str:
        auth = f"{username}:{password}@" if username is not None else ""
        return f"mqtt://{auth}127.0.0.1:{self.nodes[index].mqtt_port}"

    def urls(self, username: str | None = None, password: str | None = None) -> str:
        """Every node's MQTT URL, comma-separated, as SLMOPS_MQTT_URL takes them."""
        return ",".join(self.url(i, username, password) for i in range(len(self.nodes)))

    @property
    def admin_urls(self) -> str:
        return self.urls(self.admin_user, self.admin_secret)

    def pid_file(self, node: NatsNode) -> Path:
        return self.workdir / f"{node.name}.pid"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.users.path.exists():
            self.users.sync({})
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout_s)
        self._create_mqtt_streams(timeout_s)

    def kill(self, index: int) -> None:
        """kill -9: no goodbye to the cluster or to the clients."""
        node = self.nodes[index]
        if node.process is not None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
            node.process = None

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        self.kill(index)
        self._spawn(self.nodes[index])
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is None:
                continue
            terminate(node.process)
            node.process = None

    def reload(self, timeout_s: float = 15.0) -> None:
        """SIGHUP every live node and wait until each has reloaded (a signal only starts it: a
        client connecting at once could still meet the old users)."""
        live = [node for node in self.nodes if node.alive and node.process is not None]
        before = {node.name: self._reloads(node) for node in live}
        for node in live:
            node.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while any(self._reloads(node) <= before[node.name] for node in live if node.alive):
            if time.monotonic() > deadline:
                raise MqttError(f"a NATS node did not reload within {timeout_s}s")
            time.sleep(0.02)

    def _reloads(self, node: NatsNode) -> int:
        path = self.workdir / f"{node.name}.log"
        return path.read_text(errors="replace").count("Reloaded server configuration") if path.exists() else 0

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every live node listens on MQTT and reports a JetStream meta leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise MqttError(
                        f"nats-server {node.name} exited with {node.process.returncode}: {self.log_tail(node)}"
                    )
            if all(self._node_ready(n) for n in self.nodes if n.alive):
                return
            time.sleep(0.1)
        raise MqttError(f"the NATS cluster was not ready within {timeout_s}s")

    def _create_mqtt_streams(self, timeout_s: float) -> None:
        """Connect once over MQTT: the first connection of an account creates its replicated MQTT
        streams, which takes a loaded machine longer than the clients under test wait for a CONNACK."""
        client = MqttClient(self.url(0, self.admin_user, self.admin_secret), client_id=f"warm-{uuid.uuid4().hex[:8]}")
        try:
            client.start(timeout_s=timeout_s)
        finally:
            client.stop(publish_offline=False)

    def _node_ready(self, node: NatsNode) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=0.2):
                pass
            url = f"http://127.0.0.1:{node.http_port}/jsz"
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback monitor
                info = json.load(response)
        except (OSError, ValueError):
            return False
        meta = info.get("meta_cluster")  # absent on a single node
        return len(self.nodes) == 1 or bool((meta or {}).get("leader"))

    def log_tail(self, node: NatsNode, lines: int = 20) -> str:
        path = self.workdir / f"{node.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _spawn(self, node: NatsNode) -> None:
        config = self.workdir / f"{node.name}.conf"
        config.write_text(self.render_node_config(node))
        log = open(self.workdir / f"{node.name}.log", "ab")  # noqa: SIM115 - the child holds it
        node.process = subprocess.Popen([NATS_SERVER, "-c", str(config)], stdout=log, stderr=log)
        log.close()

    def render_node_config(self, node: NatsNode) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes if n is not node)
        store = self.workdir / node.name / "jetstream"
        # One node is no cluster: JetStream refuses a cluster block without routes.
        cluster = f"cluster {{ name: slmops, listen: 127.0.0.1:{node.cluster_port}, routes: [{routes}] }}"
        cluster = cluster if len(self.nodes) > 1 else ""
        # The shape of deploy/nats/node.conf, on free loopback ports.
        return f"""
server_name: {node.name}
listen: 127.0.0.1:{node.client_port}
http: 127.0.0.1:{node.http_port}
pid_file: "{self.pid_file(node)}"
jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 2GB }}
{cluster}
mqtt {{ listen: 127.0.0.1:{node.mqtt_port}, stream_replicas: {min(3, len(self.nodes))}, {self.mqtt_options} }}
include "users.conf"
"""

    def node_of(self, client_id: str) -> int | None:
        """The index of the live node `client_id` is connected to over MQTT (monitoring /connz)."""
        for index, node in enumerate(self.nodes):
            if not node.alive:
                continue
            try:
                url = f"http://127.0.0.1:{node.http_port}/connz?limit=100000"
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback monitor
                    connections = json.load(response).get("connections") or []
            except (OSError, ValueError):
                continue
            if any(c.get("mqtt_client") == client_id for c in connections):
                return index
        return None

    def connection_counts(self) -> list[int]:
        """MQTT and NATS connections per live node (0 for a dead one)."""
        counts = []
        for node in self.nodes:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/varz", timeout=2) as response:  # noqa: S310
                    counts.append(int(json.load(response).get("connections", 0)))
            except (OSError, ValueError):
                counts.append(0)
        return counts
