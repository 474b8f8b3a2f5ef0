"""Ingest msg/s from a JetStream stream with one vs two control-plane replicas, and the MQTT path
on the same load for reference, side by side in one run.

Each side stores the same N telemetry windows (M devices) into one PostgreSQL database with the
control plane's IngestWriter. The load is queued first, then the replicas are let go and timed
until every window is in the database, so only the consumer side is measured:
  - jetstream x1 / x2: windows published over nats-server's MQTT listener, captured by the stream;
    one or two replica processes fetch through the one durable consumer (JetStreamIngest).
  - mqtt x1: windows queued by a private Mosquitto for the replica's persistent session; one
    replica process reconnects and ingests them (DeviceMessageSubscriber, ingest journal off).
CPU seconds are the replicas' (user + system, all of them) and the broker's, over the timed part.

    python benchmarks/jetstream_ingest.py --count 20000 --devices 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from control_plane import db  # noqa: E402
from control_plane.fleet.ingest import IngestWriter  # noqa: E402
from shared.topics import Topics  # noqa: E402
from tests.support.jetstream import NatsServerProcess, publish_over_mqtt, telemetry_payloads  # noqa: E402
from tests.support.telemetry import add_devices  # noqa: E402

PG_ADMIN_URL = os.environ.get("SLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(source: str, database_url: str, url: str, prefix: str, client_id: str) -> None:
    """One replica: says `ready` once connected, ingests after `go`, reports after `stop`."""
    writer = IngestWriter(db.make_engine(database_url))
    topics = Topics(prefix)
    with contextlib.ExitStack() as stack:
        if source == "jetstream":
            from control_plane.fleet.jetstream import JetStreamIngest

            ingest = JetStreamIngest([url], topics, writer, name=client_id)
            hold = stack.enter_context(contextlib.ExitStack())
            hold.enter_context(ingest.held())
            ingest.start()
            stack.callback(ingest.stop)
            print("ready", flush=True)
            sys.stdin.readline()
            started = _cpu_s()
            hold.close()
        else:
            from control_plane.fleet.subscriber import DeviceMessageSubscriber
            from shared.mqtt.client import MqttClient

            def connect() -> MqttClient:
                client = MqttClient(url, client_id=client_id, persistent_session=True)
                subscriber = DeviceMessageSubscriber(client, topics, writer)
                subscriber.start()
                client.start(wait=True, timeout_s=15)
                stack.callback(subscriber.stop)
                return client

            connect().stop(publish_offline=False)  # the session, subscribed, now queues for us
            print("ready", flush=True)
            sys.stdin.readline()
            started = _cpu_s()
            stack.callback(connect().stop, publish_offline=False)
        sys.stdin.readline()
        print(json.dumps({"cpu_s": _cpu_s() - started, "stored": writer.counters["telemetry"]}), flush=True)


def _replicas(source: str, count: int, database_url: str, url: str, prefix: str) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", source, database_url, url, prefix, f"bench-{source}-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return procs


def _stored(engine: sa.Engine, device_ids: list[str]) -> int:
    with engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM telemetry_windows WHERE device_id = ANY(:ids)")
        return int(conn.execute(query, {"ids": device_ids}).scalar_one())


def _stream_size(nats_url: str) -> int:
    import asyncio

    import nats

    async def size() -> int:
        nc = await nats.connect(nats_url)
        try:
            return int((await nc.jetstream().stream_info("SLMOPS_DEVICES")).state.messages)
        finally:
            await nc.close()

    return asyncio.run(size())


def run_side(
    source: str, replicas: int, engine: sa.Engine, database_url: str, broker: Any, count: int, devices: int
) -> dict[str, Any]:
    prefix = f"slmops-bench/{uuid.uuid4().hex[:8]}"
    device_ids = add_devices(engine, *(f"bench-{uuid.uuid4().hex[:10]}" for _ in range(devices)))
    load = telemetry_payloads(Topics(prefix), device_ids, per_device=count // devices)
    url = broker.url if source == "jetstream" else broker.admin_url
    procs = _replicas(source, replicas, database_url, url, prefix)
    try:
        if source == "jetstream":
            publish_over_mqtt(broker.mqtt_port, load, client_id=f"bench-devices-{prefix[-8:]}", timeout_s=600)
            while _stream_size(broker.url) < len(load):
                time.sleep(0.05)
        else:
            _publish_to_mosquitto(broker, load)
        broker_cpu = psutil.Process(broker._process.pid)
        before = sum(broker_cpu.cpu_times()[:2])
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        while _stored(engine, device_ids) < len(load):
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        broker_s = sum(broker_cpu.cpu_times()[:2]) - before
        reports = []
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            reports.append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(30)
    return {
        "side": f"{source} x{replicas}",
        "messages": len(load),
        "seconds": elapsed,
        "replica_cpu_s": sum(r["cpu_s"] for r in reports),
        "broker_cpu_s": broker_s,
        "shares": [r["stored"] for r in reports],
    }


def _publish_to_mosquitto(mosquitto: Any, load: list[tuple[str, bytes]]) -> None:
    from shared.mqtt.client import MqttClient, Outgoing

    client = MqttClient(mosquitto.admin_url, client_id=f"bench-devices-{uuid.uuid4().hex[:6]}")
    client.start()
    try:
        client.publish_many([Outgoing(topic, payload, qos=1) for topic, payload in load], timeout_s=600)
    finally:
        client.stop(publish_offline=False)
    time.sleep(0.5)  # the broker queues the last ones for the offline session


@contextlib.contextmanager
def _database() -> Any:
    name = f"slmops_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        db.upgrade(url)
        engine = db.make_engine(url)
        yield url, engine
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--worker", nargs=5, metavar=("SOURCE", "DB", "URL", "PREFIX", "CLIENT_ID"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from tests.support.mosquitto import MosquittoProcess

    rows = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database_url, engine = stack.enter_context(_database())
        for replicas in (1, 2):
            nats_server = NatsServerProcess(workdir / f"nats-{replicas}")
            nats_server.start()
            try:
                rows.append(
                    run_side("jetstream", replicas, engine, database_url, nats_server, args.count, args.devices)
                )
            finally:
                nats_server.stop()
        mosquitto = MosquittoProcess(workdir / "mosquitto", topics=Topics("slmops-bench"))
        mosquitto.start()
        stack.callback(mosquitto.stop)
        rows.append(run_side("mqtt", 1, engine, database_url, mosquitto, args.count, args.devices))
    print(f"{args.count} telemetry windows from {args.devices} devices into PostgreSQL, queued before the timer")
    print(f"{'side':<14} {'seconds':>8} {'msg/s':>8} {'replica CPU s':>14} {'broker CPU s':>13}  per replica")
    for row in rows:
        rate = row["messages"] / row["seconds"]
        print(
            f"{row['side']:<14} {row['seconds']:>8.2f} {rate:>8.0f} {row['replica_cpu_s']:>14.2f} "
            f"{row['broker_cpu_s']:>13.2f}  {row['shares']}"
        )


if __name__ == "__main__":
    main()
