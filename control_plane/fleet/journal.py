"""A write-ahead journal of what the control plane's ingest acknowledged to the broker but has not
stored yet, so a crash (kill -9 included) loses none of it (docs/adr/0003-ingest-journal.md). Why
this and not acknowledging each message after its batch commits (paho's manual_ack):
docs/adr/0010-manual-ack-vs-ingest-journal.md.

paho acknowledges a QoS 1 message (PUBACK) as soon as on_message returns, and the broker then
forgets it; ingest stores it later, in batches. Here every message read is appended to the
journal first, and the journal is written to its file once per burst of packets read, before the
network thread sends the PUBACKs that burst queued (`MqttClient.add_read_burst_hook`): one write()
per burst, not per message. The file is not fsynced: the operating system keeps what a killed
process wrote, a host that loses power does not (as PostgreSQL with synchronous_commit off).

The writer reports how far it stored, in arrival order (`stored_up_to`); that watermark is kept in
a file of its own, and a segment whose messages are all stored is deleted. After a restart,
`unstored()` gives back what was acknowledged and never stored, in order, to be ingested again
before the client reconnects. A message stored just before a crash, ahead of its watermark,
comes back too: the database keeps telemetry windows and events once per device and message id,
and a state applied twice leaves the device as it was.

Record: 4-byte length, 8-byte sequence number, 8-byte receive time (float seconds), 2-byte topic
length, topic, payload. A record torn by a crash mid-write ends the segment: its message was
never acknowledged, so the broker delivers it again.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_HEAD = struct.Struct("!IqdH")  # record length, seq, received at, topic length
SEGMENT_RECORDS = 50_000  # messages per segment file: a segment goes once all of them are stored


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    topic: str
    payload: bytes
    received_at: datetime


class IngestJournal:
    """`record` and `flush` on the network thread, `stored_up_to` on the writer's."""

    def __init__(self, directory: str | Path, *, segment_records: int = SEGMENT_RECORDS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segment_records = segment_records
        self._watermark_path = self.directory / "stored-up-to"
        self._lock = threading.Lock()  # guards _segments and the watermark
        self._stored = self._read_watermark()
        self._segments = sorted(self.directory.glob("segment-*.log"))  # closed ones, then the active one
        # Numbers go on from the last one journaled: the watermark and segment names refer to them.
        last = [r.seq for r in self._records(self._segments[-1:])] or [_first_seq(p) - 1 for p in self._segments[-1:]]
        self._last_seq = max([self._stored, *last])
        self._pending: list[bytes] = []
        self._fd: int | None = None
        self._in_segment = 0

    def record(self, topic: str, payload: bytes, received_at: datetime) -> int:
        """Journal one message (written at the next `flush`); returns its sequence number."""
        self._last_seq += 1
        raw = topic.encode()
        size = _HEAD.size + len(raw) + len(payload)
        self._pending.append(_HEAD.pack(size, self._last_seq, received_at.timestamp(), len(raw)) + raw + payload)
        return self._last_seq

    def flush(self) -> None:
        """Write what `record` gathered; called before the PUBACKs of those messages are sent."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        first = self._last_seq - len(pending) + 1
        while pending:
            if self._fd is None or self._in_segment >= self._segment_records:
                self._open_segment(first)
            room = self._segment_records - self._in_segment
            chunk, pending = pending[:room], pending[room:]
            assert self._fd is not None
            os.write(self._fd, b"".join(chunk))
            self._in_segment += len(chunk)
            first += len(chunk)

    def stored_up_to(self, seq: int) -> None:
        """Every message up to `seq` is stored (or counted as lost): forget them."""
        with self._lock:
            if seq <= self._stored:
                return
            self._stored = seq
            tmp = self._watermark_path.with_suffix(".tmp")
            tmp.write_text(str(seq))
            os.replace(tmp, self._watermark_path)
            # A closed segment goes once the next one starts after the watermark.
            while len(self._segments) > 1 and _first_seq(self._segments[1]) <= seq + 1:
                self._segments.pop(0).unlink(missing_ok=True)

    def unstored(self) -> Iterator[JournalRecord]:
        """What was journaled after the watermark, in order (after a restart)."""
        with self._lock:
            segments, stored = list(self._segments), self._stored
        for record in self._records(segments):
            if record.seq > stored:
                yield record

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_segment(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        path = self.directory / f"segment-{first_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._in_segment = 0
        with self._lock:
            self._segments.append(path)

    def _read_watermark(self) -> int:
        try:
            return int(self._watermark_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    @staticmethod
    def _records(segments: list[Path]) -> Iterator[JournalRecord]:
        for path in segments:
            data = path.read_bytes()
            at = 0
            while at + _HEAD.size <= len(data):
                size, seq, received, topic_len = _HEAD.unpack_from(data, at)
                if at + size > len(data) or size < _HEAD.size + topic_len:
                    break  # torn by a crash mid-write: never acknowledged, the broker sends it again
                start = at + _HEAD.size
                topic = data[start : start + topic_len].decode()
                payload = data[start + topic_len : at + size]
                yield JournalRecord(seq, topic, payload, datetime.fromtimestamp(received, UTC))
                at += size


def _first_seq(path: Path) -> int:
    return int(path.stem.removeprefix("segment-"))
