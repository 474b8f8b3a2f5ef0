"""The on-disk telemetry spool: bounds, drop counting, order, restart, partial drains."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.mqtt.spool import MessageSpool, SpooledMessage
from shared.mqtt.dedup import RecentIds
from shared.mqtt.errors import SpoolError


def payloads(spool: MessageSpool) -> list[bytes]:
    return [m.payload for m in spool.peek(10_000)]


def test_fifo_order_and_nothing_lost_within_the_bound(tmp_path: Path) -> None:
    spool = MessageSpool(tmp_path / "spool.db", max_messages=100)
    for i in range(50):
        assert spool.append("t", f"w{i}".encode()) == 0
    sent: list[SpooledMessage] = []
    assert spool.drain(sent.append, batch=7) == 50
    assert [m.payload for m in sent] == [f"w{i}".encode() for i in range(50)]
    assert len(spool) == 0 and spool.dropped_total == 0 and spool.take_dropped() == 0


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = MessageSpool(tmp_path / "spool.db", max_messages=3)
    dropped = [spool.append("t", f"w{i}".encode()) for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    assert payloads(spool) == [b"w2", b"w3", b"w4"]
    assert spool.take_dropped() == 2
    assert spool.take_dropped() == 0, "the count is handed over once"
    assert spool.dropped_total == 2


def test_byte_bound_drops_oldest(tmp_path: Path) -> None:
    spool = MessageSpool(tmp_path / "spool.db", max_messages=1000, max_bytes=25)
    for i in range(5):
        spool.append("t", bytes([65 + i]) * 10)
    assert payloads(spool) == [b"D" * 10, b"E" * 10]
    assert spool.size_bytes == 20 and spool.take_dropped() == 3
    with pytest.raises(SpoolError):
        spool.append("t", b"x" * 26)


def test_survives_restart_with_queue_and_unreported_drops(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = MessageSpool(path, max_messages=2)
    for i in range(3):
        spool.append("telemetry/t", f"w{i}".encode(), retain=False)
    spool.close()
    reopened = MessageSpool(path, max_messages=2)
    assert payloads(reopened) == [b"w1", b"w2"]
    assert reopened.peek(1)[0].topic == "telemetry/t"
    assert reopened.take_dropped() == 1
    reopened.append("t", b"w3")
    assert payloads(reopened) == [b"w2", b"w3"]


def test_failed_send_keeps_the_message_and_the_rest(tmp_path: Path) -> None:
    spool = MessageSpool(tmp_path / "spool.db")
    for i in range(5):
        spool.append("t", f"w{i}".encode())
    sent: list[bytes] = []

    def send(message: SpooledMessage) -> None:
        if message.payload == b"w2":
            raise ConnectionError("broker gone")
        sent.append(message.payload)

    with pytest.raises(ConnectionError):
        spool.drain(send)
    assert sent == [b"w0", b"w1"]
    assert payloads(spool) == [b"w2", b"w3", b"w4"]


def test_recent_ids_applies_each_id_once_and_forgets_the_oldest() -> None:
    seen = RecentIds(capacity=2)
    assert seen.first_time("a") and not seen.first_time("a")
    assert seen.first_time("b") and seen.first_time("c")
    assert "a" not in seen and len(seen) == 2
    assert seen.first_time("a"), "evicted ids count as new again"
