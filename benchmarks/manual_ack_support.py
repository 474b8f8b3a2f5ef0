"""The manual-acknowledgement spike's ingest (ADR 0010): the PUBACK of a device message leaves once
the batch holding it is committed, not when paho's on_message returns.

Built on the product's MqttClient and DeviceMessageSubscriber so that decoding, deduplication,
batching and the writer are the ones measured against the ingest journal; only the moment of
the PUBACK differs. Kept in benchmarks/: ADR 0010 keeps the journal.

`python -m benchmarks.manual_ack_support --mode manual|journal|none ...` is one consuming process
for the kill -9 measurement: it ingests into PostgreSQL with the product's IngestWriter until killed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion

from control_plane import db
from control_plane.fleet.decode import IngestCounters, MessageDecoder
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.journal import IngestJournal
from control_plane.fleet.subscriber import DeviceMessage, DeviceMessageSubscriber
from shared.mqtt.client import MqttClient
from shared.topics import Topics

# PUBACK on read (no journal); journal, then PUBACK (today); PUBACK after the commit; the same
# with the broker's window of `window` unacknowledged messages kept strictly.
MODES = ("none", "journal", "manual", "manual-strict")


class ManualAckClient(MqttClient):
    """paho with `manual_ack=True`: QoS 1 messages are acknowledged by `ack(mids)` only."""

    current_mid = 0  # the packet id of the message being handed to the handlers (network thread)

    def _build_paho(self, protocol: MQTTProtocolVersion) -> paho.Client:
        client = super()._build_paho(protocol)
        client.manual_ack_set(True)
        return client

    def _on_message(self, c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        self.current_mid = message.mid
        super()._on_message(c, u, message)

    def ack(self, mids: list[int]) -> None:
        client = self._paho
        if client is None or not mids:
            return
        with self._paho_lock:
            for mid in mids:
                client.ack(mid, 1)


class AckingDecoder(MessageDecoder):
    """Acknowledges a message dropped at decoding (a redelivery, a malformed one) at once."""

    def __init__(self, topics: Topics, counters: IngestCounters, acknowledge: Callable[[list[int]], None]) -> None:
        super().__init__(topics, counters)
        self._acknowledge = acknowledge

    def __call__(self, topic: str, payload: bytes, received_at: datetime, seq: int = 0) -> DeviceMessage | None:
        decoded = super().__call__(topic, payload, received_at, seq)
        if decoded is None:
            self._acknowledge([seq])
        return decoded


class ManualAckSubscriber(DeviceMessageSubscriber):
    """Acknowledges each message after the handler call that took its batch returned (or gave up).

    `seq` carries the MQTT packet id instead of a journal number. A message dropped at decoding
    (a redelivery, a malformed one) is acknowledged at once: nothing of it is to be stored.
    """

    client: ManualAckClient

    def __init__(
        self, client: ManualAckClient, topics: Topics, handler: Any, *, window: int | None = None, **kwargs: Any
    ) -> None:
        """`window`: hold at most this many messages unacknowledged, as a broker that keeps its
        inflight limit after the first PUBACK would (Mosquitto 2.0.11 does not: ADR 0010). The
        network thread waits for the writer's acknowledgements and reads nothing meanwhile."""
        super().__init__(client, topics, handler, on_settled=self._settled_ack, **kwargs)
        self.acked = 0
        self._window = window
        self._unacked = 0
        self._room = threading.Condition()
        self._stopping = threading.Event()
        self.decoder = AckingDecoder(topics, self.counters, self._acknowledge)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        super().stop(timeout_s)

    def _receive(self, topic: str, payload: bytes) -> None:
        if self._window is not None:
            with self._room:
                while self._unacked >= self._window and not self._stopping.is_set():
                    self._room.wait(0.5)
                self._unacked += 1
        self._accept(topic, payload, datetime.now(UTC), self.client.current_mid)

    def _acknowledge(self, mids: list[int]) -> None:
        self.client.ack(mids)
        if self._window is not None:
            with self._room:
                self._unacked -= len(mids)
                self._room.notify()

    def _settled_ack(self, batch: list[DeviceMessage]) -> None:
        self._acknowledge([m.seq for m in batch])  # in arrival order (MQTT 3.1.1 section 4.6)
        self.acked += len(batch)


def mosquitto_config(port: int, workdir: Path, *, max_inflight: int, persistence: bool = False) -> str:
    """Anonymous, one listener; `max_inflight` is the window of unacknowledged QoS 1 messages."""
    lines = [
        "per_listener_settings false",
        "allow_anonymous true",
        f"listener {port} 127.0.0.1",
        "max_queued_messages 1000000",
        f"max_inflight_messages {max_inflight}",
        f"pid_file {workdir / 'mosquitto.pid'}",
        *([f"user {getpass.getuser()}"] if os.geteuid() == 0 else []),
        *(["persistence true", f"persistence_location {workdir}/"] if persistence else []),
        "log_dest stderr",
        "log_type error",
        "",
    ]
    return "\n".join(lines)


def build_ingest(
    mode: str, url: str, topics: Topics, handler: Any, *, client_id: str, journal_dir: Path | None,
    persistent: bool = False, protocol: str = "3.1.1", max_batch: int = 500, max_write: int = 2000,
    window: int | None = None,
) -> DeviceMessageSubscriber:  # fmt: skip
    """The ingest subscriber of `mode` on a client not yet started (start the subscriber first)."""
    if mode.startswith("manual"):
        client: MqttClient = ManualAckClient(url, client_id=client_id, persistent_session=persistent, protocol=protocol)
        strict = window if mode == "manual-strict" else None
        return ManualAckSubscriber(client, topics, handler, window=strict, max_batch=max_batch, max_write=max_write)  # type: ignore[arg-type]
    client = MqttClient(url, client_id=client_id, persistent_session=persistent, protocol=protocol)
    journal = IngestJournal(journal_dir) if mode == "journal" and journal_dir is not None else None
    return DeviceMessageSubscriber(client, topics, handler, max_batch=max_batch, max_write=max_write, journal=journal)


def consume(args: argparse.Namespace) -> None:
    """One control plane's ingest, as `slmops server` runs it (persistent session, QoS 1), until killed."""
    engine = db.make_engine(args.database)
    ingest = build_ingest(
        args.mode, args.broker, Topics(args.prefix), IngestWriter(engine), client_id=args.client_id,
        journal_dir=Path(args.journal_dir), persistent=True,
    )  # fmt: skip
    ingest.start()
    ingest.client.start(wait=True, timeout_s=15)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--journal-dir", required=True)
    consume(parser.parse_args())
