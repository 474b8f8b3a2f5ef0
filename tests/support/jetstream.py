"""A private single-node `nats-server` with JetStream and an MQTT listener, for tests and benchmarks.

Debian's nats-server 2.9 refuses `.` inside an MQTT topic level (later versions map it to `//`),
so device names used against it avoid dots.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho

from shared.messages import TelemetryMessage, encode
from shared.net import free_port
from shared.telemetry import Summary, TelemetryWindow
from shared.topics import Topics


def nats_server_binary() -> str | None:
    return shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


class NatsServerProcess:
    """`start()` returns once both listeners accept; `stop()` ends the process (its store stays)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.mqtt_port = free_port()
        self.extra_config = ""  # e.g. a cluster block
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self, timeout_s: float = 10.0) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"server_name: slmops-test-{self.port}\n"
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n" + self.extra_config
        )
        log = (self.workdir / "nats.log").open("ab")
        self._process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not all(_accepts(port) for port in (self.port, self.mqtt_port)):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not start: see {self.workdir / 'nats.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def telemetry_payloads(topics: Topics, device_ids: list[str], per_device: int) -> list[tuple[str, bytes]]:
    """(topic, payload) of `per_device` windows from each device, each with its own message id."""
    out = []
    for seq in range(per_device):
        for device_id in device_ids:
            window = TelemetryWindow(
                seq=seq,
                window_start=_at(seq),
                window_end=_at(seq + 1),
                requests=20,
                latency_s=Summary(count=20, p50=0.04, p95=0.08, p99=0.09, max=0.1),
            )
            out.append((topics.telemetry(device_id), encode(TelemetryMessage.wrap(window))))
    return out


def _at(seq: int) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=10 * seq)


def publish_over_mqtt(
    mqtt_port: int, messages: list[tuple[str, bytes]], *, client_id: str, timeout_s: float = 60
) -> None:
    """Publish as a device does (QoS 1, MQTT 3.1.1) and return once every PUBACK came back."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"the broker did not acknowledge {len(messages)} publishes in {timeout_s} s")
    finally:
        client.disconnect()
        client.loop_stop()


class NatsClusterProcesses:
    """Three clustered `nats-server` nodes on loopback, JetStream and an MQTT listener on each;
    `kill(i)` ends node i with SIGKILL."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [NatsServerProcess(workdir / f"n{i}") for i in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        for i, node in enumerate(self.nodes):
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
            node.extra_config = (
                f"cluster {{ name: slmops-test, listen: 127.0.0.1:{self.cluster_ports[i]}, routes: [{routes}] }}\n"
            )
            node.start()

    def kill(self, index: int) -> None:
        process = self.nodes[index]._process
        if process is not None:
            process.kill()
            process.wait()
            self.nodes[index]._process = None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
