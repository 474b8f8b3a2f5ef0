"""A simulated fleet of N devices against a real `slmops server` (PostgreSQL, Mosquitto): rollout
convergence next to a raw retained publish, telemetry ingest, and the server's resident memory.

One run, one machine, figures side by side:
  1. promote -> every device's acknowledgement stored by the control plane, next to N raw retained
     QoS 1 messages published to the same broker and received by one live subscriber, and by N
     subscribers with one topic each (the broker's fan-out, as to devices) (target ratio <= 2),
     and the CPU seconds each process spent on a rollout (`fleet_support.CpuMeter`);
  2. telemetry windows published by the devices at a fixed offered rate through the control
     plane's ingest path (subscriber -> IngestWriter -> PostgreSQL): stored rate, loss and the p99
     of (stored at - window end) (target >= 5,000 msg/s, zero loss);
  4. the server's RSS idle, with N devices connected, after the rollout and after the ingest.

The devices are `slmops.simulate` agents in this process (asyncio, one MQTT connection and one
enrolled credential each). The broker is a private Mosquitto with max_queued_messages raised
(the system one keeps the default 1000, which drops a 10,000-message QoS 1 burst).

    .venv/bin/python benchmarks/fleet_scale.py --devices 10000 --rates 5000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet_support import (  # noqa: E402
    BROKER_PIDS,
    CpuMeter,
    Server,
    fresh_postgres,
    private_mosquitto,
    push_version,
    slmops_server,
    start_rollout,
    wait_completed,
)
from benchmarks.mqtt_retained import fanout, run_once  # noqa: E402
from slmops.heap import settle_heap  # noqa: E402
from slmops.simulate import SimConfig, SimFleet, enroll_fleet, raise_fd_limit, run  # noqa: E402
from slmops.tinymodels.gguf_tiny import write_tiny_gguf  # noqa: E402

ONLINE = "SELECT count(*) FROM devices WHERE status = 'online'"
ACKED = (
    "SELECT count(*) FROM devices d JOIN desired_states s ON s.device_id = d.id "
    "WHERE s.version = :v AND d.acked_message_id = s.message_id"
)
STORED = "SELECT count(*) FROM telemetry_windows"
LAG = (
    "SELECT count(*), min(received_at), max(received_at), "
    "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - window_end)), "
    "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - window_end)), "
    "max(extract(epoch FROM received_at - window_end)) FROM telemetry_windows WHERE received_at > :since"
)


def scalar(engine: sa.Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


async def poll(
    engine: sa.Engine,
    sql: str,
    target: int,
    timeout_s: float,
    interval_s: float = 0.05,
    max_share: float = 0.1,
    **params: object,
) -> float:
    """Seconds until the query's count reaches `target` (polled off the event loop), waiting at
    least `interval_s` between queries and long enough that they take at most `max_share` of
    the time: the measurement must not take the CPU it measures from the processes it times
    (the acknowledgement count of 10,000 devices costs PostgreSQL ~10 ms, which every 20 ms
    was half a core of the two)."""
    start = time.perf_counter()
    while True:
        asked = time.perf_counter()
        value = await asyncio.to_thread(scalar, engine, sql, **params)
        if value >= target:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            raise SystemExit(f"timed out: {value}/{target} for {sql[:60]}")
        took = time.perf_counter() - asked
        await asyncio.sleep(max(interval_s, took * (1 - max_share) / max_share))


async def drain(engine: sa.Engine, target: int, stall_s: float = 30.0) -> None:
    """Wait until `target` windows are stored, or none more arrived for `stall_s` (the rest are lost)."""
    stored, last_change = -1, time.perf_counter()
    while stored < target and time.perf_counter() - last_change < stall_s:
        now_stored = await asyncio.to_thread(scalar, engine, STORED)
        if now_stored != stored:
            stored, last_change = now_stored, time.perf_counter()
        await asyncio.sleep(0.2)


def progress(what: str):  # type: ignore[no-untyped-def]
    step = {"next": 0}

    def report(done: int, total: int) -> None:
        if done >= step["next"] or done == total:
            print(f"  {what} {done}/{total}", flush=True)
            step["next"] = done + max(1, total // 5)

    return report


async def rollout_phase(
    server: Server, engine: sa.Engine, sim: SimFleet, n: int, version: str = "1", meter: CpuMeter | None = None
) -> dict[str, float]:
    """Roll `version` out to all N devices at once; seconds until applied and until every ack is
    stored, and with `meter` the CPU seconds each process spent meanwhile (`cpu_<role>`)."""
    applied_before = sim.stats.applied
    cpu_before = meter.read() if meter else {}
    start = time.perf_counter()
    await asyncio.to_thread(start_rollout, server, "bench", version)
    created = time.perf_counter() - start
    ok = await sim.wait(lambda: sim.stats.applied - applied_before >= n, timeout_s=600)
    applied = time.perf_counter() - start
    cpu_applied = meter.read() if meter else {}
    if not ok:
        raise SystemExit(f"only {sim.stats.applied - applied_before}/{n} devices applied the desired state")
    # Polled every 20 ms, or 9 times as long as a query takes if that is longer (see poll): the
    # figure is late by half that on average (one query costs PostgreSQL about 1 ms per 1,000
    # devices: 20 ms at 1,000 devices, ~90 ms at 10,000).
    await poll(engine, ACKED, n, 600, interval_s=0.02, v=version)
    acked = time.perf_counter() - start
    cpu = CpuMeter.since(cpu_before, meter.read()) if meter else {}
    until_applied = {f"applied_{k}": v for k, v in CpuMeter.since(cpu_before, cpu_applied).items()} if meter else {}
    return {"created": created, "applied": applied, "acked": acked, **cpu, **until_applied}


async def ingest_phase(engine: sa.Engine, sim: SimFleet, rate: int, seconds: float) -> dict[str, float]:
    """Offer `rate` windows/s for `seconds`, spread over the fleet, then wait for every one to be stored."""
    print(f"  offering {rate} telemetry windows/s for {seconds:.0f} s", flush=True)
    since = await asyncio.to_thread(lambda: _now(engine))
    before = await asyncio.to_thread(scalar, engine, STORED)
    sent_before = sim.stats.telemetry_sent
    tick_s, agents, i = 0.01, sim.agents, 0
    per_tick = max(1, round(rate * tick_s))
    start = time.perf_counter()
    ticks = int(seconds / tick_s)
    for k in range(ticks):
        batch = [agents[(i + j) % len(agents)] for j in range(per_tick)]
        i += per_tick
        await asyncio.gather(*(a.send_telemetry(1.0) for a in batch))
        # Pace against the clock so a slow tick is made up for, not accumulated.
        await asyncio.sleep(max(0.0, start + (k + 1) * tick_s - time.perf_counter()))
    offered_s = time.perf_counter() - start
    sent = sim.stats.telemetry_sent - sent_before
    await drain(engine, before + sent)
    with engine.connect() as conn:
        count, first, last, p50, p99, worst = conn.execute(sa.text(LAG), {"since": since}).one()
    span = (last - first).total_seconds() if count > 1 else float("nan")
    return {
        "offered": sent / offered_s, "sent": sent, "stored": count, "stored_rate": count / span,
        "p50": p50, "p99": p99, "max": worst,
    }  # fmt: skip


def _now(engine: sa.Engine) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT now()")).scalar_one()


async def measure(args: argparse.Namespace) -> None:
    n = args.devices
    with fresh_postgres() as db_url, private_mosquitto() as mqtt_url, slmops_server(db_url, mqtt_url) as server:
        engine = sa.create_engine(db_url, pool_size=2)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(1, args.rollouts + 1):
                push_version(server, "bench", str(r), write_tiny_gguf(Path(tmp) / f"m{r}.gguf", seed=r))
        rss = {"idle": server.rss_mb()}
        start = time.perf_counter()
        creds = await enroll_fleet(server.url, server.token, n, mqtt_url=mqtt_url, progress=progress("enrolled"))
        print(f"enrolled {n} devices through the REST API in {time.perf_counter() - start:.1f} s", flush=True)
        sim = SimFleet(creds, SimConfig(apply_delay_s=0.0, telemetry_interval_s=None))
        start = time.perf_counter()
        await sim.start(concurrency=200, progress=progress("connected"))
        settle_heap()  # as `slmops simulate` does: the agents are long-lived
        await poll(engine, ONLINE, n, 600)
        print(f"{n} devices connected, all online in the control plane, in {time.perf_counter() - start:.1f} s")
        rss["connected"] = server.rss_mb()
        rounds = []
        meter = CpuMeter(server, mqtt_url)
        for r in range(1, args.rollouts + 1):
            rounds.append(await rollout_phase(server, engine, sim, n, version=str(r), meter=meter))
            print(f"  rollout {r}: POST {rounds[-1]['created']:.3f} s, applied {rounds[-1]['applied']:.3f} s, "
                  f"stored {rounds[-1]['acked']:.3f} s", flush=True)  # fmt: skip
            await asyncio.to_thread(wait_completed, server)
        times = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
        rss["after rollout"] = server.rss_mb()
        ingest = [await ingest_phase(engine, sim, rate, args.ingest_seconds) for rate in args.rates]
        rss["after ingest"] = server.rss_mb()
        await sim.stop()
        engine.dispose()
        baseline = run_once(mqtt_url, n, payload_size=600, broker_pid=BROKER_PIDS[mqtt_url])
        fan, fan_cpu = await fanout(mqtt_url, n, payload_size=600, broker_pid=BROKER_PIDS[mqtt_url])
        raw_cpu = {"raw": baseline.cpu_s, "fanout": fan_cpu}
    report(n, times, baseline.live_received_s, fan, ingest, rss, raw_cpu)


def report_convergence(
    n: int, times: dict[str, float], raw_s: float, fanout_s: float, raw_cpu: dict[str, float] | None = None
) -> None:
    """The rollout's figures next to both raw baselines, with their ratios; with `raw_cpu` (CPU
    seconds of each raw run, its publisher, subscribers and broker), the CPU each side needed."""
    print(f"raw: {n} retained QoS 1 publishes, one live subscriber has all   {raw_s:8.3f} s")
    print(f"raw: {n} retained QoS 1 publishes, {n} subscribers have theirs  {fanout_s:8.3f} s")
    print(f"rollout: POST /v1/rollouts returned                              {times['created']:8.3f} s")
    for key, what in (("applied", "every device acknowledged (applied) its state"),
                      ("acked", "control plane stored every acknowledgement")):  # fmt: skip
        print(f"rollout: {what:<56}{times[key]:8.3f} s  ratio {times[key] / raw_s:5.2f} to one subscriber, "
              f"{times[key] / fanout_s:5.2f} to {n} (target <= 2)")  # fmt: skip
    if cpu := {k.removeprefix("cpu_"): v for k, v in times.items() if k.startswith("cpu_")}:
        spent = ", ".join(f"{role} {s:.2f} s" for role, s in cpu.items())
        print(f"rollout: CPU from POST to every ack stored: {spent}; {sum(cpu.values()):.2f} s in all "
              f"({1e6 * sum(cpu.values()) / n:.0f} us per device)")  # fmt: skip
    if applied_cpu := {k.removeprefix("applied_cpu_"): v for k, v in times.items() if k.startswith("applied_cpu_")}:
        spent = ", ".join(f"{role} {s:.2f} s" for role, s in applied_cpu.items())
        print(f"rollout: CPU from POST to the last device applied: {spent}; {sum(applied_cpu.values()):.2f} s in all")
    if raw_cpu and applied_cpu:
        # On a host whose cores are all busy, wall time follows CPU time: a rollout that needs K
        # times the CPU of the raw publish cannot take much less than K times as long there.
        total, one, fan = sum(applied_cpu.values()), raw_cpu["raw"], raw_cpu["fanout"]
        print(f"raw: CPU of the publish to one subscriber {one:.2f} s, to {n} subscribers {fan:.2f} s "
              f"(publisher, subscribers, broker); the rollout needed {total / one:.2f} / {total / fan:.2f} "
              "times as much")  # fmt: skip


def report(
    n: int,
    times: dict[str, float],
    raw_s: float,
    fanout_s: float,
    ingest: list[dict[str, float]],
    rss: dict[str, float],
    raw_cpu: dict[str, float] | None = None,
) -> None:
    print(f"\n== 1. rollout convergence, {n} devices (private Mosquitto, PostgreSQL, slmops server) ==")
    report_convergence(n, times, raw_s, fanout_s, raw_cpu)
    print("\n== 2. telemetry ingest (MQTT -> subscriber -> IngestWriter -> PostgreSQL) ==")
    print(f"{'offered msg/s':>14} {'sent':>8} {'stored':>8} {'lost':>6} {'stored msg/s':>13} "
          f"{'p50 lag':>9} {'p99 lag':>9} {'max lag':>9}")  # fmt: skip
    for r in ingest:
        print(f"{r['offered']:>14.0f} {r['sent']:>8.0f} {r['stored']:>8.0f} {r['sent'] - r['stored']:>6.0f} "
              f"{r['stored_rate']:>13.0f} {r['p50']:>8.3f}s {r['p99']:>8.3f}s {r['max']:>8.3f}s")  # fmt: skip
    print("target: >= 5,000 msg/s with zero loss")
    print(f"\n== 4. slmops server resident memory ({n} devices) ==")
    for what, mb in rss.items():
        print(f"{what:<16} {mb:8.1f} MiB")


def main() -> None:
    raise_fd_limit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[5000])
    parser.add_argument("--ingest-seconds", type=float, default=20.0)
    parser.add_argument("--rollouts", type=int, default=1, help="rollouts to all N devices (their median is reported)")
    run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
