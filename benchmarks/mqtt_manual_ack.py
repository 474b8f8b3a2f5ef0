"""Manual acknowledgement vs the ingest journal (ADR 0010), side by side in one run.

Five measurements, on brokers started for this run and a fresh PostgreSQL database, through the
product's IngestWriter (one transaction per batch):
  window     how many unacknowledged QoS 1 messages a broker sends a manual-ack subscriber
             (Mosquitto at several max_inflight_messages, MQTT 3.1.1 and 5; the embedded amqtt)
  throughput ingest msg/s: PUBACK on read (none), journal then PUBACK (journal, today), PUBACK
             after the batch commits (manual; manual-strict: with the broker's window kept),
             for each Mosquitto window and on amqtt
  kill       the consuming process killed with SIGKILL mid-stream and started again (persistent
             session, QoS 1): windows stored vs published, per mode
  journal    the journal's own cost per message on the network thread
  amqtt      the embedded broker with PUBACKs held longer than its 5 s wait, then a reconnect

    python -m benchmarks.mqtt_manual_ack                  # everything, about 10 minutes
    python -m benchmarks.mqtt_manual_ack --only kill --count 20000
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session

from benchmarks.fleet_support import fresh_postgres
from benchmarks.manual_ack_support import MODES, ManualAckClient, build_ingest, mosquitto_config
from benchmarks.mqtt_ingest import timed_publish
from control_plane import db
from control_plane.fleet.broker import EmbeddedBroker
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.journal import IngestJournal
from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, DeviceStatus
from shared.messages import TelemetryMessage, encode
from shared.mqtt.client import MqttClient, Outgoing
from shared.net import free_port
from shared.telemetry import TelemetryWindow
from shared.topics import Topics
from tests.support.mosquitto import MosquittoProcess

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def mosquitto(max_inflight: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = mosquitto_config(port, Path(tmp), max_inflight=max_inflight)
        broker = MosquittoProcess(Path(tmp), topics=Topics("b"), port=port, config=config)
        broker.start()
        try:
            yield broker.url()
        finally:
            broker.stop()


@contextlib.contextmanager
def embedded() -> Iterator[str]:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        yield broker.url
    finally:
        broker.stop()


class AmqttWarnings(logging.Handler):
    """amqtt's warnings, counted instead of printed (while `amqtt_warnings()` is open)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in m for m in self.records)


@contextlib.contextmanager
def amqtt_warnings() -> Iterator[AmqttWarnings]:
    warnings = AmqttWarnings()
    amqtt_log = logging.getLogger("amqtt")
    amqtt_log.addHandler(warnings)
    amqtt_log.setLevel(logging.WARNING)
    amqtt_log.propagate = False
    try:
        yield warnings
    finally:
        amqtt_log.removeHandler(warnings)
        amqtt_log.propagate = True


PUBACK_TIMEOUT = "Timeout waiting for PUBACK"  # amqtt gave up on a delivery after 5 s


def windows(topics: Topics, device_ids: list[str], count: int, seq0: int = 0) -> list[Outgoing]:
    now = datetime.now(UTC)
    return [
        Outgoing(
            topics.telemetry(device_ids[i % len(device_ids)]),
            encode(TelemetryMessage.wrap(TelemetryWindow(seq=seq0 + i // len(device_ids), window_start=now,
                                                         window_end=now, requests=20))),
        )
        for i in range(count)
    ]  # fmt: skip


def wait_until(check: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step_s)
    return check()


def settle(read: Callable[[], int], quiet_s: float, timeout_s: float) -> int:
    """`read()` once it stopped changing for `quiet_s`."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


# -- window ---------------------------------------------------------------------------------


def unacked_window(url: str, protocol: str, published: int = 3000) -> tuple[int, int]:
    """Messages a subscriber receives before the broker stops sending: acknowledging nothing, then
    after it acknowledged those."""
    topics = Topics(f"b/{uuid.uuid4().hex[:8]}/v1")
    mids: list[int] = []
    consumer = ManualAckClient(url, client_id=f"w-{uuid.uuid4().hex[:6]}", protocol=protocol)  # type: ignore[arg-type]
    consumer.start()
    consumer.subscribe(topics.all_devices("telemetry"), lambda _t, _p: mids.append(consumer.current_mid))
    publisher = MqttClient(url, client_id=f"p-{uuid.uuid4().hex[:6]}", protocol=protocol)  # type: ignore[arg-type]
    publisher.start()
    try:
        publisher.publish_many(windows(topics, ["dev-1"], published), timeout_s=60)
        first = settle(lambda: len(mids), quiet_s=1.0, timeout_s=15)
        consumer.ack(mids[:first])
        return first, settle(lambda: len(mids), quiet_s=1.0, timeout_s=15) - first
    finally:
        publisher.stop(publish_offline=False)
        consumer.stop(publish_offline=False)


def run_window(inflights: list[int]) -> None:
    print("\n== window: QoS 1 messages a manual-ack subscriber receives (3000 published): acknowledging "
          "none, then after acknowledging those")  # fmt: skip
    for inflight in inflights:
        with mosquitto(inflight) as url:
            row = {p: unacked_window(url, p) for p in ("3.1.1", "5")}
        print(f"mosquitto max_inflight_messages={inflight:<5}  3.1.1: {row['3.1.1'][0]:>5} then {row['3.1.1'][1]:>5}"
              f"   5: {row['5'][0]:>5} then {row['5'][1]:>5}")  # fmt: skip
    with embedded() as url:
        first, then = unacked_window(url, "3.1.1")
        print(f"amqtt (embedded broker)                3.1.1: {first:>5} then {then:>5}")


# -- throughput -----------------------------------------------------------------------------


class Fleet:
    """A migrated database with `devices` registered devices, and a count of stored windows."""

    def __init__(self, url: str, devices: int) -> None:
        db.upgrade(url)
        self.engine = db.make_engine(url)
        with Session(self.engine) as session:
            fleet = [Device(name=f"d{i:05d}", status=DeviceStatus.online) for i in range(devices)]
            session.add_all(fleet)
            session.commit()
            self.device_ids = [d.id for d in fleet]
        self.seq0 = 0  # every run stores new windows: a conflict would be cheaper than a write

    def stored(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM telemetry_windows")).scalar_one())

    def next_windows(self, topics: Topics, count: int) -> list[Outgoing]:
        out = windows(topics, self.device_ids, count, self.seq0)
        self.seq0 += count // len(self.device_ids) + 1
        return out


def ingest_rate(
    url: str, fleet: Fleet, mode: str, count: int, journal_dir: Path, window: int
) -> tuple[float, float, float]:
    """(msg/s from the first publish to the last commit, mean messages per transaction, CPU us per
    message of this process: ingest and publisher, not the broker's nor PostgreSQL's, unless the
    broker is amqtt). CPU time barely moves when a neighbour takes the cores; wall time does."""
    topics = Topics(f"b/{uuid.uuid4().hex[:8]}/v1")
    messages = fleet.next_windows(topics, count)
    writer = IngestWriter(fleet.engine)
    stored = [0]
    done = threading.Event()

    def handler(batch: list[DeviceMessage]) -> None:
        writer(batch)
        stored[0] += len(batch)
        if stored[0] >= count:
            done.set()

    client_id = f"i-{uuid.uuid4().hex[:6]}"
    ingest = build_ingest(mode, url, topics, handler, client_id=client_id, journal_dir=journal_dir, window=window)
    ingest.start()
    ingest.client.start(wait=True, timeout_s=15)
    try:
        cpu = time.process_time()
        elapsed = timed_publish(url, messages, done, lambda: f"{mode}: stored {stored[0]}/{count}")
        cpu_us = (time.process_time() - cpu) / count * 1e6
        return count / elapsed, ingest.counters.dispatched / max(ingest.counters.batches, 1), cpu_us
    finally:
        ingest.stop()
        ingest.client.stop(publish_offline=False)


def best_rates(
    url: str, fleet: Fleet, modes: tuple[str, ...], count: int, rounds: int, window: int,
    amqtt: AmqttWarnings | None = None,
) -> str:  # fmt: skip
    """One table row: each mode's best of `rounds`, interleaved so a neighbour's load falls on all
    alike; with `amqtt`, also the PUBACKs amqtt stopped waiting for, summed over the rounds."""
    best: dict[str, tuple[float, float]] = {}
    cpu: dict[str, float] = {}
    timeouts: dict[str, int] = dict.fromkeys(modes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode in modes:
                before = amqtt.count(PUBACK_TIMEOUT) if amqtt else 0
                rate, per_txn, cpu_us = ingest_rate(url, fleet, mode, count, Path(tmp) / f"{mode}-{r}", window)
                if mode not in best or rate > best[mode][0]:
                    best[mode] = (rate, per_txn)
                cpu[mode] = min(cpu.get(mode, cpu_us), cpu_us)
                if amqtt is not None:  # every message is stored and acknowledged by now
                    timeouts[mode] += amqtt.count(PUBACK_TIMEOUT) - before
    late = {m: f" t={timeouts[m]}" if amqtt else "" for m in modes}
    cell = {m: f"{best[m][0]:.0f} ({best[m][1]:.0f}) {cpu[m]:.0f}{late[m]}" for m in best}
    return "".join(f"{cell.get(m, '-'):>22}" for m in MODES)


def run_throughput(database: str, inflights: list[int], count: int, devices: int, rounds: int) -> None:
    print(f"\n== throughput: {count} telemetry windows from {devices} devices into PostgreSQL, msg/s "
          f"(mean messages per transaction), best of {rounds}; then this process's CPU us per message, least of "
          f"{rounds}; on amqtt, t= PUBACKs it stopped waiting for after 5 s")  # fmt: skip
    fleet = Fleet(database, devices)
    print(f"{'max_inflight_messages':<22}" + "".join(f"{m:>22}" for m in MODES))
    for inflight in inflights:
        modes = MODES if inflight else MODES[:3]  # 0: no window to keep
        with mosquitto(inflight) as url:
            print(f"{inflight:<22}" + best_rates(url, fleet, modes, count, rounds, inflight))
    with amqtt_warnings() as warnings, embedded() as url:
        print(f"{'amqtt (no window)':<22}" + best_rates(url, fleet, MODES[:3], count, rounds, 0, warnings))


def run_journal_cost(count: int, burst: int = 50) -> None:
    """What the journal adds per message on the network thread: record, and a write() per burst."""
    topic, payload = "slmops/v1/devices/d00001/telemetry", windows(Topics("slmops/v1"), ["d00001"], 1)[0].payload
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        journal = IngestJournal(tmp)
        start = time.perf_counter()
        for i in range(count):
            journal.record(topic, payload, now)  # type: ignore[arg-type]
            if i % burst == burst - 1:
                journal.flush()
        journal.close()
        elapsed = time.perf_counter() - start
    print(f"\n== journal cost: {count} records of {len(payload)} bytes, a write() per {burst}: "
          f"{elapsed / count * 1e6:.1f} us per message")  # fmt: skip


# -- kill -9 --------------------------------------------------------------------------------


def kill_run(
    url: str, fleet: Fleet, mode: str, count: int, kill_at: float, workdir: Path, *, stalled: bool = False
) -> dict[str, int]:
    """Publish `count` windows; SIGKILL the consumer once `kill_at` of them are stored (`stalled`:
    and its writer then waited 2 s on a table lock, as on a slow or busy database); restart it."""
    topics = Topics(f"b/{uuid.uuid4().hex[:8]}/v1")
    messages = fleet.next_windows(topics, count)
    before = fleet.stored()
    args = [sys.executable, "-m", "benchmarks.manual_ack_support", "--mode", mode, "--broker", url,
            "--prefix", topics.prefix, "--database", fleet.engine.url.render_as_string(hide_password=False),
            "--client-id", f"cp-{mode}-{uuid.uuid4().hex[:6]}", "--journal-dir", str(workdir / mode)]  # fmt: skip

    def consumer() -> subprocess.Popen[str]:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return process

    first = consumer()
    publisher = MqttClient(url, client_id=f"p-{uuid.uuid4().hex[:6]}")
    publisher.start()
    try:
        sender = threading.Thread(target=publisher.publish_many, args=(messages,), kwargs={"timeout_s": 300})
        sender.start()
        wait_until(lambda: fleet.stored() - before >= kill_at * count, timeout_s=120, step_s=0.01)
        with fleet.engine.connect() as blocker:
            if stalled:
                blocker.execute(sa.text("LOCK TABLE telemetry_windows IN ACCESS EXCLUSIVE MODE"))
                time.sleep(2.0)  # the consumer reads on while its writer waits
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            blocker.rollback()
        at_kill = fleet.stored() - before
        sender.join()
    finally:
        publisher.stop(publish_offline=False)
    second = consumer()
    try:
        final = settle(lambda: fleet.stored() - before, quiet_s=3.0, timeout_s=180)
    finally:
        second.terminate()
        second.wait()
    return {"published": count, "stored_at_kill": at_kill, "stored": final, "lost": count - final}


def run_kill(database: str, count: int, devices: int, inflight: int, rounds: int) -> None:
    print(f"\n== kill -9: {count} windows from {devices} devices, consumer killed once 30% are stored "
          f"(stalled: after its writer waited 2 s on a table lock), restarted; Mosquitto "
          f"max_inflight_messages={inflight}, persistent session, QoS 1")  # fmt: skip
    fleet = Fleet(database, devices)
    with mosquitto(inflight) as url, tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for stalled in (False, True):
                for mode in ("none", "journal", "manual"):
                    row = kill_run(url, fleet, mode, count, 0.3, Path(tmp) / f"{r}-{stalled}", stalled=stalled)
                    label = f"{mode}{' stalled' if stalled else ''}"
                    print(f"{label:<16} " + "  ".join(f"{k}={v}" for k, v in row.items()))


# -- amqtt with delayed PUBACKs ---------------------------------------------------------------


def run_amqtt(hold_s: float, published: int = 200) -> None:
    print(f"\n== amqtt: {published} messages, PUBACKs held {hold_s:.0f}s, then sent; then a reconnect")
    with amqtt_warnings() as warnings, embedded() as url:
        topics = Topics(f"b/{uuid.uuid4().hex[:8]}/v1")
        mids: list[int] = []
        client_id = f"cp-{uuid.uuid4().hex[:6]}"
        consumer = ManualAckClient(url, client_id=client_id, persistent_session=True)
        consumer.start()
        consumer.subscribe(topics.all_devices("telemetry"), lambda _t, _p: mids.append(consumer.current_mid))
        publisher = MqttClient(url, client_id=f"p-{uuid.uuid4().hex[:6]}")
        publisher.start()
        publisher.publish_many(windows(topics, ["dev-1"], published), timeout_s=60)
        received = settle(lambda: len(mids), quiet_s=1.0, timeout_s=10)
        time.sleep(max(hold_s - 1.0, 0))
        timeouts = warnings.count(PUBACK_TIMEOUT)
        consumer.ack(list(mids))
        time.sleep(1.0)
        unknown = warnings.count("unknown pending message")
        print(f"received before any PUBACK: {received}; amqtt stopped waiting for {timeouts} PUBACKs "
              f"after 5 s; {unknown} late PUBACKs refused as unknown; none sent again")  # fmt: skip
        # Unacknowledged ones on a persistent session: does amqtt send them again after a reconnect?
        mids.clear()
        publisher.publish_many(windows(topics, ["dev-1"], 50), timeout_s=60)
        settle(lambda: len(mids), quiet_s=1.0, timeout_s=10)
        consumer.stop(publish_offline=False)
        mids.clear()
        consumer.start()
        again = settle(lambda: len(mids), quiet_s=2.0, timeout_s=10)
        print(f"50 more received and never acknowledged, then a reconnect: {again} sent again")
        consumer.stop(publish_offline=False)
        publisher.stop(publish_offline=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("window", "throughput", "journal", "kill", "amqtt"))
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inflight", type=int, nargs="*", default=[20, 100, 1000, 0])  # none: amqtt only
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if args.only in (None, "window"):
        run_window(args.inflight)
    if args.only in (None, "throughput"):
        with fresh_postgres("slmops_manualack") as database:
            run_throughput(database, args.inflight, args.count, args.devices, args.rounds)
    if args.only in (None, "journal"):
        run_journal_cost(100_000)
    if args.only in (None, "kill"):
        with fresh_postgres("slmops_manualack") as database:
            run_kill(database, args.count, args.devices, inflight=100, rounds=args.rounds)
    if args.only in (None, "amqtt"):
        run_amqtt(hold_s=7.0)


if __name__ == "__main__":
    main()
