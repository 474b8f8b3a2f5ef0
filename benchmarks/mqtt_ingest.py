"""Control-plane ingest throughput: N telemetry windows from M devices through DeviceMessageSubscriber.

Prints messages/s for a raw subscriber (bytes only) next to the typed ingest (decode, validate,
deduplicate, batch), so the cost of the typed path is visible as a ratio.

    python benchmarks/mqtt_ingest.py --count 10000 --devices 1000   # private Mosquitto (default)
    python benchmarks/mqtt_ingest.py --broker mqtt://127.0.0.1:1883 --count 1000
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from control_plane.fleet.subscriber import DeviceMessage, DeviceMessageSubscriber
from shared.messages import TelemetryMessage, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.telemetry import Summary, TelemetryWindow
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess


def windows(topics: Topics, count: int, devices: int) -> list[Outgoing]:
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        window = TelemetryWindow(
            seq=i // devices,
            window_start=now,
            window_end=now,
            requests=20,
            latency_s=Summary(count=20, p50=0.04, p95=0.08, p99=0.09, max=0.1),
        )
        out.append(Outgoing(topics.telemetry(f"dev-{i % devices:05d}"), encode(TelemetryMessage.wrap(window))))
    return out


def measure(url: str, count: int, devices: int, typed: bool) -> float:
    topics = Topics(f"slmops-bench/{uuid.uuid4().hex[:8]}/v1")
    messages = windows(topics, count, devices)
    done = threading.Event()
    seen = [0]

    def raw(_topic: str, _payload: bytes) -> None:
        seen[0] += 1
        if seen[0] >= count:
            done.set()

    def batch(items: list[DeviceMessage]) -> None:
        seen[0] += len(items)
        if seen[0] >= count:
            done.set()

    consumer = MqttClient(url, client_id=f"bench-ingest-{uuid.uuid4().hex[:6]}")
    consumer.start()
    ingest = DeviceMessageSubscriber(consumer, topics, batch) if typed else None
    if ingest is not None:
        ingest.start()
    else:
        consumer.subscribe(topics.all_devices("telemetry"), raw)
    try:
        return timed_publish(url, messages, done, lambda: f"received {seen[0]}/{count}")
    finally:
        if ingest is not None:
            ingest.stop()
        consumer.stop(publish_offline=False)


def timed_publish(url: str, messages: list[Outgoing], done: threading.Event, progress: Callable[[], str]) -> float:
    """Seconds from the first publish until `done` is set (exits with `progress()` after 300 s)."""
    publisher = MqttClient(url, client_id=f"bench-dev-{uuid.uuid4().hex[:6]}")
    publisher.start()
    try:
        start = time.perf_counter()
        publisher.publish_many(messages, timeout_s=300)
        if not done.wait(300):
            raise SystemExit(progress())
        return time.perf_counter() - start
    finally:
        publisher.stop(publish_offline=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--broker",
        help="a broker URL; default: a private Mosquitto with max_queued_messages raised (the system "
        "one keeps Mosquitto's default of 1000 and drops beyond it for a slow consumer)",
    )
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.broker
        if url is None:
            mosquitto = MosquittoProcess(
                Path(stack.enter_context(tempfile.TemporaryDirectory())), topics=Topics("slmops-bench")
            )
            mosquitto.start()
            stack.callback(mosquitto.stop)
            url = mosquitto.admin_url
        raw_s = measure(url, args.count, args.devices, typed=False)
        typed_s = measure(url, args.count, args.devices, typed=True)
    print(f"{args.count} telemetry windows from {args.devices} devices via {args.broker or 'a private Mosquitto'}")
    print(f"{'raw subscriber':<22} {raw_s:>8.3f}s {args.count / raw_s:>9.0f} msg/s")
    print(f"{'typed batched ingest':<22} {typed_s:>8.3f}s {args.count / typed_s:>9.0f} msg/s")
    print(f"ratio typed/raw: {typed_s / raw_s:.2f}")


if __name__ == "__main__":
    main()
