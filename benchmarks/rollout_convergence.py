"""Promote -> every device acknowledged, for N simulated devices, next to a raw retained publish.

A real `slmops server` (PostgreSQL, a private Mosquitto) rolls versions out to N simulated devices
(`slmops.simulate`: one MQTT connection and one enrolled credential each, in this process). Each
round times, from the POST /v1/rollouts that promotes a new version to 100 %:
  * every device holding and acknowledging (applying) its new desired state, and
  * the control plane having stored every acknowledgement (state naming the desired message id),
next to N retained QoS 1 messages published raw to the same broker, with the same devices
connected, received (a) by one live subscriber to all the topics, and (b) by N subscribers, one
connection per topic, as the devices receive their desired states (the broker's fan-out to N
sockets is then in both figures). The raw runs happen in a process of their own. Rounds alternate
raw and rollout, so both see the same machine; the medians and the ratios are printed (target
ratio <= 2 at 1,000 devices), with the CPU seconds the server, the broker, PostgreSQL and the
simulated devices spent on each rollout (`fleet_support.CpuMeter`: comparable across days on a
shared host, where wall times are not).

    .venv/bin/python benchmarks/rollout_convergence.py --devices 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet_scale import ONLINE, poll, report_convergence, rollout_phase  # noqa: E402
from benchmarks.fleet_support import (  # noqa: E402
    BROKER_PIDS,
    CpuMeter,
    fresh_postgres,
    private_mosquitto,
    push_version,
    slmops_server,
    wait_completed,
)
from benchmarks.mqtt_retained import run_fanout, run_once  # noqa: E402
from slmops.heap import settle_heap  # noqa: E402
from slmops.simulate import SimConfig, SimFleet, enroll_fleet, raise_fd_limit, run  # noqa: E402
from slmops.tinymodels.gguf_tiny import write_tiny_gguf  # noqa: E402


async def measure(args: argparse.Namespace) -> None:
    n = args.devices
    rounds: list[dict[str, float]] = []
    # The raw publisher runs in a process of its own, started before the devices connect: paho's
    # threaded loop waits on select(), which cannot watch the descriptors above 1,024 that a
    # process holding N device sockets hands out.
    raw_worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    raw_worker.submit(time.sleep, 0).result()
    loop = asyncio.get_running_loop()
    with (
        raw_worker,
        fresh_postgres() as db_url,
        private_mosquitto() as mqtt_url,
        slmops_server(db_url, mqtt_url) as server,
    ):
        engine = sa.create_engine(db_url, pool_size=2)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(1, args.rounds + 1):
                push_version(server, "bench", str(r), write_tiny_gguf(Path(tmp) / f"m{r}.gguf", seed=r))
        creds = await enroll_fleet(server.url, server.token, n, mqtt_url=mqtt_url)
        sim = SimFleet(creds, SimConfig(apply_delay_s=0.0, telemetry_interval_s=None))
        await sim.start(concurrency=200)
        settle_heap()  # as `slmops simulate` does: the agents are long-lived
        await poll(engine, ONLINE, n, 600)
        print(f"{n} simulated devices connected and online", flush=True)
        meter, broker_pid = CpuMeter(server, mqtt_url), BROKER_PIDS[mqtt_url]
        for r in range(1, args.rounds + 1):
            raw = await loop.run_in_executor(raw_worker, run_once, mqtt_url, n, 600, broker_pid)
            fan, fan_cpu = await loop.run_in_executor(raw_worker, run_fanout, mqtt_url, n, 600, broker_pid)
            times = await rollout_phase(server, engine, sim, n, version=str(r), meter=meter)
            await asyncio.to_thread(wait_completed, server)
            cpu = {"raw_cpu": raw.cpu_s, "fan_cpu": fan_cpu}
            rounds.append({"raw": raw.live_received_s, "fanout": fan, **cpu, **times})
            print(f"  round {r}: raw {raw.live_received_s:.3f} s, raw to {n} subscribers {fan:.3f} s, "
                  f"applied {times['applied']:.3f} s, stored {times['acked']:.3f} s", flush=True)  # fmt: skip
        await sim.stop()
        engine.dispose()
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"\n{n} devices, {len(rounds)} rounds (medians; private Mosquitto, PostgreSQL, slmops server)")
    raw_cpu = {"raw": median["raw_cpu"], "fanout": median["fan_cpu"]}
    report_convergence(n, median, median["raw"], median["fanout"], raw_cpu)


def main() -> None:
    raise_fd_limit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
