"""Raw-publish baseline: N retained QoS 1 messages, one per device topic, to one subscriber.

This is what the rollout benchmark compares "promote -> every device acknowledged" against.
For each broker it prints the time until every PUBACK is back, the time until a live subscriber
holds all N, and the time for a subscriber that connects afterwards to receive the N retained
messages (how offline devices pick up their desired state).

    python benchmarks/mqtt_retained.py                        # system Mosquitto and embedded amqtt
    python benchmarks/mqtt_retained.py --count 10000 --broker mqtt://127.0.0.1:1883
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from shared.mqtt.client import MqttClient, Outgoing
from shared.mqtt.url import parse_broker_url
from shared.net import free_port
from shared.topics import Topics
from slmops.simulate import raise_fd_limit, run
from slmops.simulate.wire import MqttWire
from tests.support.mosquitto import MosquittoProcess

SYSTEM_MOSQUITTO = "mqtt://127.0.0.1:1883"
EMBEDDED = "embedded"
PRIVATE = "private-mosquitto"


@dataclass
class Result:
    broker: str
    count: int
    all_acked_s: float
    live_received_s: float
    late_received_s: float
    cpu_s: float = 0.0  # until the live subscriber had all: this process, and the broker given its pid


class CpuWindow:
    """CPU seconds since it was made, of this process (every thread: publisher and subscribers)
    and of the broker when its pid is known, so a timed window's CPU can be set beside the wall
    time of another measured on the same host."""

    def __init__(self, broker_pid: int | None) -> None:
        self._broker = psutil.Process(broker_pid) if broker_pid else None
        self._start = self._now()

    def _now(self) -> float:
        broker = sum(self._broker.cpu_times()[:2]) if self._broker is not None else 0.0
        return time.process_time() + broker

    def spent(self) -> float:
        return self._now() - self._start


class Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, _topic: str, _payload: bytes) -> None:
        with self._lock:
            self.seen += 1
            if self.seen >= self.target:
                self.done.set()


def run_once(url: str, count: int, payload_size: int, broker_pid: int | None = None) -> Result:
    topics = Topics(f"slmops-bench/{uuid.uuid4().hex[:8]}/v1")  # under the private ACL's prefix
    messages = [
        Outgoing(topics.desired(f"dev-{i:06d}"), os.urandom(payload_size // 2).hex().encode(), retain=True)
        for i in range(count)
    ]
    live = Counter(count)
    subscriber = MqttClient(url, client_id=f"bench-sub-{uuid.uuid4().hex[:6]}")
    publisher = MqttClient(url, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    subscriber.start()
    publisher.start()
    subscriber.subscribe(topics.all_devices("desired"), live)
    try:
        cpu, start = CpuWindow(broker_pid), time.perf_counter()
        publisher.publish_many(messages, timeout_s=300)
        acked = time.perf_counter() - start
        if not live.done.wait(30):
            # Mosquitto drops QoS 1 messages beyond a client's max_queued_messages (default 1000).
            raise SystemExit(f"live subscriber got {live.seen}/{count}: raise max_queued_messages")
        received, cpu_s = time.perf_counter() - start, cpu.spent()
        late_s = _late_subscriber(url, topics, count)
    finally:
        # Empty retained payloads delete the benchmark's messages from the broker.
        publisher.publish_many([Outgoing(m.topic, b"", retain=True) for m in messages], timeout_s=300)
        subscriber.stop(publish_offline=False)
        publisher.stop(publish_offline=False)
    return Result(url, count, acked, received, late_s, cpu_s)


def run_fanout(url: str, count: int, payload_size: int, broker_pid: int | None = None) -> tuple[float, float]:
    """Seconds from the first publish until each of `count` subscribers holds its own message:
    one retained QoS 1 message per topic, one connection subscribed to each topic (the path a
    rollout's desired states take to their devices, with nothing done on either side); and the
    CPU seconds that took (`CpuWindow`)."""
    raise_fd_limit()
    return run(fanout(url, count, payload_size, broker_pid))


async def fanout(url: str, count: int, payload_size: int, broker_pid: int | None = None) -> tuple[float, float]:
    """`run_fanout` on the running loop (the caller raises the descriptor limit)."""
    tag = uuid.uuid4().hex[:8]
    topics = Topics(f"slmops-bench/{tag}/v1")
    # The publisher connects first: paho waits on select(), which needs its descriptor below 1,024.
    publisher = MqttClient(url, client_id=f"bench-fanout-pub-{tag}")
    publisher.start()
    broker = parse_broker_url(url)
    received = 0
    everyone = asyncio.Event()

    def on_message(_topic: str, _payload: bytes) -> None:
        nonlocal received
        received += 1
        if received >= count:
            everyone.set()

    def connect(i: int) -> Coroutine[Any, Any, MqttWire]:
        return MqttWire.open(broker.host, broker.port, f"bench-fanout-{tag}-{i}", on_message=on_message)

    wires: list[MqttWire] = []
    try:
        for first in range(0, count, 200):  # bounded concurrency, as the simulator connects
            wires += await asyncio.gather(*(connect(i) for i in range(first, min(first + 200, count))))
        await asyncio.gather(*(w.subscribe(topics.desired(f"dev-{i:06d}"), qos=1) for i, w in enumerate(wires)))
        messages = [
            Outgoing(topics.desired(f"dev-{i:06d}"), os.urandom(payload_size // 2).hex().encode(), retain=True)
            for i in range(count)
        ]
        cpu, start = CpuWindow(broker_pid), time.perf_counter()
        await asyncio.to_thread(publisher.publish_many, messages, timeout_s=300)
        await asyncio.wait_for(everyone.wait(), 120)
        elapsed, cpu_s = time.perf_counter() - start, cpu.spent()
        cleared = [Outgoing(m.topic, b"", retain=True) for m in messages]
        await asyncio.to_thread(publisher.publish_many, cleared, timeout_s=300)
    finally:
        await asyncio.gather(*(w.close() for w in wires), return_exceptions=True)
        publisher.stop(publish_offline=False)
    return elapsed, cpu_s


def _late_subscriber(url: str, topics: Topics, count: int) -> float:
    late = Counter(count)
    client = MqttClient(url, client_id=f"bench-late-{uuid.uuid4().hex[:6]}")
    start = time.perf_counter()
    client.start()
    client.subscribe(topics.all_devices("desired"), late, timeout_s=None)
    if not late.done.wait(300):
        raise SystemExit(f"late subscriber got {late.seen}/{count}")
    elapsed = time.perf_counter() - start
    client.stop(publish_offline=False)
    return elapsed


def start_embedded_broker() -> tuple[subprocess.Popen[bytes], str]:
    """The embedded broker in its own process, as `slmops server` would run it beside the API."""
    port = free_port()
    code = (
        "import time; from control_plane.fleet.broker import EmbeddedBroker; "
        f"b = EmbeddedBroker(port={port}); b.start(); print('ready', flush=True); time.sleep(3600)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise SystemExit("the embedded broker did not start")
    return process, f"mqtt://127.0.0.1:{port}"


@contextlib.contextmanager
def broker_at(broker: str) -> Iterator[str]:
    if broker == EMBEDDED:
        process, url = start_embedded_broker()
        try:
            yield url
        finally:
            process.kill()
            process.wait()
    elif broker == PRIVATE:
        with tempfile.TemporaryDirectory() as workdir:
            mosquitto = MosquittoProcess(Path(workdir), topics=Topics("slmops-bench"))
            mosquitto.start()
            try:
                yield mosquitto.admin_url
            finally:
                mosquitto.stop()
    else:
        yield broker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--payload-bytes", type=int, default=600, help="about a DesiredState's size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per broker; the best is reported")
    parser.add_argument(
        "--broker",
        action="append",
        help=f"URL, '{EMBEDDED}' or '{PRIVATE}' (ours, with ACLs and max_queued_messages raised); "
        "default: the system Mosquitto and the embedded broker",
    )
    args = parser.parse_args()
    brokers = args.broker or [SYSTEM_MOSQUITTO, EMBEDDED]
    print(f"{args.count} retained QoS 1 messages of ~{args.payload_bytes} B, best of {args.repeat}")
    print(f"{'broker':<28} {'all PUBACKs':>12} {'live sub':>10} {'msg/s':>9} {'late sub':>10} {'msg/s':>9}")
    for broker in brokers:
        with broker_at(broker) as url:
            runs = [run_once(url, args.count, args.payload_bytes) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r.live_received_s)
        late = min(r.late_received_s for r in runs)
        name = {EMBEDDED: "embedded amqtt", PRIVATE: "private Mosquitto (ACLs)"}.get(broker, broker)
        print(
            f"{name:<28} {best.all_acked_s:>11.3f}s {best.live_received_s:>9.3f}s "
            f"{args.count / best.live_received_s:>9.0f} {late:>9.3f}s {args.count / late:>9.0f}"
        )


if __name__ == "__main__":
    main()
