"""Promote -> N devices acknowledged, on a three-node NATS cluster next to one Mosquitto, in one run.

Each broker in turn: a real `slmops server` (PostgreSQL) on it, N simulated devices
(`slmops.simulate`, in this process) enrolled through the API and connected, then rounds of
`fleet_scale.rollout_phase`: POST /v1/rollouts promoting a new version to 100 %, timed until every
device applied its desired state and until the control plane stored every acknowledgement, with
the CPU seconds of the server, the broker (all three nodes for NATS), PostgreSQL and the devices.

Mosquitto is the private one of `fleet_support` (anonymous, no ACL). NATS is `tests.support.nats`
(JetStream, R3 MQTT streams, the control plane keeping bcrypt device users in the users file each
node includes, SLMOPS_NATS_USERS_FILE), devices spread over the three nodes by device id.

    .venv/bin/python benchmarks/nats_promote.py --devices 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet_scale import ONLINE, poll, rollout_phase  # noqa: E402
from benchmarks.fleet_support import (  # noqa: E402
    BROKER_PIDS,
    CpuMeter,
    Server,
    _cpu_s,
    fresh_postgres,
    private_mosquitto,
    push_version,
    slmops_server,
    wait_completed,
)
from shared.topics import Topics  # noqa: E402
from slmops.heap import settle_heap  # noqa: E402
from slmops.simulate import SimConfig, SimFleet, enroll_fleet, raise_fd_limit, run  # noqa: E402
from slmops.tinymodels.gguf_tiny import write_tiny_gguf  # noqa: E402
from tests.support.nats import NatsCluster  # noqa: E402


class ClusterCpuMeter(CpuMeter):
    """`CpuMeter` with the broker's figure summed over every node of a cluster."""

    def __init__(self, server: Server, broker_pids: list[int]) -> None:
        BROKER_PIDS["cluster"] = broker_pids[0]
        super().__init__(server, "cluster")
        self._nodes = broker_pids

    def read(self) -> dict[str, float]:
        return super().read() | {"broker": sum(_cpu_s(pid) for pid in self._nodes)}


@contextlib.contextmanager
def mosquitto_server(db_url: str) -> Iterator[tuple[Server, str, list[int]]]:
    with private_mosquitto() as mqtt_url, slmops_server(db_url, mqtt_url) as server:
        yield server, mqtt_url, [BROKER_PIDS[mqtt_url]]


# The MQTT consumer settings of each NATS variant measured: the default replicates the consumer
# behind every QoS 1 subscription to three nodes on disk, like the streams.
NATS_VARIANTS = {
    "nats": "",
    "nats-r1mem": "consumer_replicas: 1, consumer_memory_storage: true",
}


@contextlib.contextmanager
def nats_server(db_url: str, mqtt_options: str = "") -> Iterator[tuple[Server, str, list[int]]]:
    with tempfile.TemporaryDirectory() as tmp:
        topics = Topics(f"slmops-bench/{uuid.uuid4().hex[:8]}")
        cluster = NatsCluster(Path(tmp), topics=topics, mqtt_options=mqtt_options)
        cluster.start()
        try:
            env = {
                "SLMOPS_NATS_USERS_FILE": str(cluster.users.path),
                "SLMOPS_NATS_PID_FILES": ",".join(str(cluster.pid_file(node)) for node in cluster.nodes),
                "SLMOPS_DEVICE_MQTT_URL": cluster.urls(),
            }
            with slmops_server(db_url, cluster.admin_urls, env_extra=env) as server:
                pids = [node.process.pid for node in cluster.nodes if node.process is not None]
                yield server, cluster.urls(), pids
        finally:
            cluster.stop()


async def measure_broker(name: str, n: int, rounds: int) -> dict[str, float]:
    results: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(fresh_postgres())
        if name in NATS_VARIANTS:
            server, _url, broker_pids = stack.enter_context(nats_server(db_url, NATS_VARIANTS[name]))
        else:
            server, _url, broker_pids = stack.enter_context(mosquitto_server(db_url))
        engine = sa.create_engine(db_url, pool_size=2)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(1, rounds + 1):
                push_version(server, "bench", str(r), write_tiny_gguf(Path(tmp) / f"m{r}.gguf", seed=r))
        start = time.perf_counter()
        creds = await enroll_fleet(server.url, server.token, n)  # the broker URL(s) the server hands out
        enrolled = time.perf_counter() - start
        sim = SimFleet(creds, SimConfig(apply_delay_s=0.0, telemetry_interval_s=None))
        start = time.perf_counter()
        await sim.start(concurrency=100)
        settle_heap()
        await poll(engine, ONLINE, n, 600)
        connected = time.perf_counter() - start
        print(f"{name}: {n} devices enrolled in {enrolled:.1f} s, online in {connected:.1f} s", flush=True)
        meter = ClusterCpuMeter(server, broker_pids)
        for r in range(1, rounds + 1):
            times = await rollout_phase(server, engine, sim, n, version=str(r), meter=meter)
            await asyncio.to_thread(wait_completed, server)
            results.append(times)
            print(f"  {name} round {r}: applied {times['applied']:.3f} s, stored {times['acked']:.3f} s", flush=True)
        await sim.stop()
        engine.dispose()
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    return median | {"enrolled": enrolled, "connected": connected}


async def measure(args: argparse.Namespace) -> None:
    names = args.brokers.split(",")
    figures = {name: await measure_broker(name, args.devices, args.rounds) for name in names}
    print(f"\n{args.devices} devices, medians of {args.rounds} rounds: promote -> ...")
    print(f"{'':44}" + "".join(f"{name:>12}" for name in names))
    rows = [
        ("enroll every device (s)", "enrolled"),
        ("connect every device, all online (s)", "connected"),
        ("POST /v1/rollouts returned (s)", "created"),
        ("every device applied its state (s)", "applied"),
        ("control plane stored every ack (s)", "acked"),
        ("CPU s, server", "cpu_server"),
        ("CPU s, broker (all nodes)", "cpu_broker"),
        ("CPU s, PostgreSQL", "cpu_postgres"),
        ("CPU s, simulated devices", "cpu_simulator"),
    ]
    for label, key in rows:
        print(f"{label:<44}" + "".join(f"{figures[name][key]:>12.3f}" for name in names))


def main() -> None:
    raise_fd_limit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="mosquitto,nats", help="of mosquitto, " + ", ".join(NATS_VARIANTS))
    run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
