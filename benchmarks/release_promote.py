"""Promote -> every device acknowledged, with release signing on and off, side by side in one run.

A real `slmops server` (PostgreSQL, a private Mosquitto) rolls a new version out to N simulated
devices (`slmops.simulate`) at 100 %. With signing on, the server signs a release into every
desired state (SLMOPS_RELEASE_SIGNING=true, keys made by `slmops keys init` for this run) and each
simulated device verifies it with the agent's own `edge_agent.trust.ReleaseGuard` against the
root it was provisioned with, then reports `release_verified`, before it acknowledges; with
signing off, desired states carry no release and the devices verify nothing. The server restarts
between rollouts with the other setting (same database, keys, data dir and topics: the devices
stay connected to the broker); rounds alternate which side goes first, so drift on a shared host
hits both. A third side, "signed", has the server sign while the devices skip the check: the
control plane's share of the cost, apart from the N verifications that the simulator (one process
on the same cores) runs one after another where a real fleet runs them in parallel. Printed: the
medians of POST -> every device applied, and -> the control plane stored every acknowledgement,
the ratios to "off" (target on/off <= 1.10), the CPU seconds each process spent, and the
device-side cost of one verification: in the simulated fleet (mean of N) and alone
(`benchmarks/release_signing.verify_ms`, one root rotation walked; target < 5 ms).

    .venv/bin/python benchmarks/release_promote.py --devices 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet_scale import ONLINE, poll, rollout_phase  # noqa: E402
from benchmarks.fleet_support import (  # noqa: E402
    CpuMeter,
    fresh_postgres,
    private_mosquitto,
    push_version,
    slmops_server,
    wait_completed,
)
from benchmarks.release_signing import verify_ms  # noqa: E402
from control_plane.trust import releases  # noqa: E402
from slmops.heap import settle_heap  # noqa: E402
from slmops.simulate import SimConfig, SimFleet, enroll_fleet, raise_fd_limit, run  # noqa: E402
from slmops.tinymodels.gguf_tiny import write_tiny_gguf  # noqa: E402

# side -> (the server signs, the devices verify); "signed" isolates the control plane's share.
SIDES = {"off": (False, False), "signed": (True, False), "on": (True, True)}


async def measure(args: argparse.Namespace) -> None:
    n = args.devices
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    verify_means: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres() as db_url, private_mosquitto() as mqtt_url:
        keys, data_dir = Path(tmp) / "keys", Path(tmp) / "server"
        releases.init_keys(keys)
        chain = releases.read_root_chain(keys / releases.ROOT_FILE)
        signing_keys = {
            "SLMOPS_RELEASE_KEY_FILE": str(keys / releases.RELEASE_KEY_FILE),
            "SLMOPS_ROOT_METADATA_FILE": str(keys / releases.ROOT_FILE),
        }
        prefix = f"slmops-bench/{uuid.uuid4().hex[:8]}"

        def server(side: str):  # type: ignore[no-untyped-def]
            env = signing_keys | {"SLMOPS_RELEASE_SIGNING": "true" if SIDES[side][0] else "false"}
            return slmops_server(db_url, mqtt_url, data_dir=data_dir, topic_prefix=prefix, env_extra=env)

        engine = sa.create_engine(db_url, pool_size=2)
        with server("on") as first:
            for r in range(1, args.rounds + 1):
                for side in SIDES:
                    path = write_tiny_gguf(Path(tmp) / f"{side}{r}.gguf", seed=r * 2 + (side == "on"))
                    push_version(first, "bench", f"{side}-{r}", path)
            creds = await enroll_fleet(first.url, first.token, n, mqtt_url=mqtt_url)
            config = SimConfig(apply_delay_s=0.0, telemetry_interval_s=None)
            sim = SimFleet(creds, config)
            await sim.start(concurrency=200)
            settle_heap()
            await poll(engine, ONLINE, n, 600)
            print(f"{n} simulated devices connected and online", flush=True)
        order = list(SIDES)
        for r in range(1, args.rounds + 1):
            for side in order[r % 3 :] + order[: r % 3]:  # each side goes first in turn
                config.trusted_root = chain if SIDES[side][1] else None  # read at each desired state
                verified, spent = sim.stats.verified, sim.stats.verify_s
                with server(side) as running:
                    times = await rollout_phase(
                        running, engine, sim, n, version=f"{side}-{r}", meter=CpuMeter(running, mqtt_url)
                    )
                    await asyncio.to_thread(wait_completed, running)
                checked = sim.stats.verified - verified
                if side == "on":
                    if checked != n or sim.stats.refused:
                        raise SystemExit(f"{checked}/{n} devices verified the release, {sim.stats.refused} refused")
                    verify_means.append((sim.stats.verify_s - spent) / checked * 1000)
                results[side].append(times)
                print(f"  round {r}, signing {side:>6}: applied {times['applied']:.3f} s, "
                      f"stored {times['acked']:.3f} s, devices verified {checked}", flush=True)  # fmt: skip
        await sim.stop()
        engine.dispose()
    report(n, results, verify_means)


def report(n: int, results: dict[str, list[dict[str, float]]], verify_means: list[float]) -> None:
    median = {side: {k: statistics.median(t[k] for t in rows) for k in rows[0]} for side, rows in results.items()}
    off, signed, on = median["off"], median["signed"], median["on"]
    rounds = len(results["on"])
    print(f"\n{n} devices, {rounds} rollouts a side (medians; private Mosquitto, PostgreSQL, slmops server)")
    print("  off: unsigned; signed: the server signs, devices skip the check; on: signed and verified")
    print(f"{'':46}{'off':>9}{'signed':>9}{'on':>9}{'signed/off':>11}{'on/off':>8}")
    for key, what in (("created", "POST /v1/rollouts returned"),
                      ("applied", "every device (verified and) applied its state"),
                      ("acked", "control plane stored every acknowledgement")):  # fmt: skip
        print(f"{what:<46}{off[key]:>8.3f}s{signed[key]:>8.3f}s{on[key]:>8.3f}s"
              f"{signed[key] / off[key]:>11.2f}{on[key] / off[key]:>8.2f}")  # fmt: skip
    fastest = {side: min(t["acked"] for t in rows) for side, rows in results.items()}
    print(
        f"{'stored every acknowledgement, fastest round':<46}{fastest['off']:>8.3f}s{fastest['signed']:>8.3f}s"
        f"{fastest['on']:>8.3f}s{fastest['signed'] / fastest['off']:>11.2f}{fastest['on'] / fastest['off']:>8.2f}"
    )
    print("target: on/off <= 1.10 for the acknowledgements")
    cpu_keys = sorted(k for k in on if k.startswith("cpu_"))
    for k in cpu_keys:
        print(f"CPU seconds per rollout, {k[4:]:<10}{off[k]:>8.2f}{signed[k]:>9.2f}{on[k]:>9.2f}")
    totals = [sum(side[k] for k in cpu_keys) for side in (off, signed, on)]
    control_plane = [sum(side[k] for k in cpu_keys if k != "cpu_simulator") for side in (off, signed, on)]
    print(f"CPU seconds per rollout, all      {totals[0]:>8.2f}{totals[1]:>9.2f}{totals[2]:>9.2f}"
          f"   (on/off {totals[2] / totals[0]:.2f}; server+broker+postgres on/off "
          f"{control_plane[2] / control_plane[0]:.2f})")  # fmt: skip
    per, bare, signed = verify_ms(200)
    in_fleet = statistics.median(verify_means)
    print(f"device verification per release in the simulated fleet: {in_fleet:.3f} ms (mean of {n} devices)")
    print(f"device verification per release alone (one root rotation walked): {per:.2f} ms (target < 5 ms)")
    print(f"desired state on the wire: {bare} bytes unsigned, {signed} bytes with its release and one root rotation")


def main() -> None:
    raise_fd_limit()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
