"""An on-disk, bounded FIFO for messages produced while the broker is unreachable.

SQLite (one file, WAL) so the queue survives a restart of the agent and a half-written message
cannot corrupt it. Bounded by count and bytes: only when a bound is hit are the OLDEST messages
dropped, and every drop is counted durably until `take_dropped()` hands the count to the next
message. Within the bound nothing is lost: `drain` removes a message only after `send` returned.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.mqtt.errors import SpoolError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS spool_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO spool_meta (key, value) VALUES ('dropped_total', 0), ('dropped_unreported', 0);
"""

_COUNT_DROPS = "UPDATE spool_meta SET value = value + ? WHERE key IN ('dropped_total', 'dropped_unreported')"


@dataclass(frozen=True)
class SpooledMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class MessageSpool:
    """Thread-safe; every method is one SQLite transaction."""

    def __init__(self, path: str | Path, *, max_messages: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open the spool at {self.path}: {exc}") from exc

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue one message; returns how many of the oldest were dropped to make room."""
        if len(payload) > self.max_bytes:
            raise SpoolError(f"a {len(payload)}-byte message exceeds the spool's {self.max_bytes} bytes")
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO spool (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                (topic, payload, qos, int(retain)),
            )
            dropped = self._enforce_bounds(db)
            if dropped:
                db.execute(_COUNT_DROPS, (dropped,))
            return dropped

    def peek(self, limit: int = 100) -> list[SpooledMessage]:
        """The oldest `limit` messages, oldest first, left in place."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [
            SpooledMessage(seq, topic, bytes(payload), qos, bool(retain)) for seq, topic, payload, qos, retain in rows
        ]

    def remove(self, seq: int) -> None:
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM spool WHERE seq = ?", (seq,))

    def drain(self, send: Callable[[SpooledMessage], None], *, batch: int = 100) -> int:
        """Send queued messages oldest first, removing each once `send` returns.

        Stops at the first exception from `send` (re-raised), leaving that message queued.
        Returns how many were sent.
        """
        sent = 0
        while messages := self.peek(batch):
            for message in messages:
                send(message)
                self.remove(message.seq)
                sent += 1
        return sent

    def take_dropped(self) -> int:
        """Drops not yet reported; resets to zero, so the caller must put the number in a message."""
        with self._lock, self._transaction() as db:
            (count,) = db.execute("SELECT value FROM spool_meta WHERE key = 'dropped_unreported'").fetchone()
            db.execute("UPDATE spool_meta SET value = 0 WHERE key = 'dropped_unreported'")
            return int(count)

    @property
    def dropped_total(self) -> int:
        return self._meta("dropped_total")

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
        return int(count)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            (size,) = self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()
        return int(size)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT value FROM spool_meta WHERE key = ?", (key,)).fetchone()
        return int(value)

    def _enforce_bounds(self, db: sqlite3.Connection) -> int:
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()
        dropped = 0
        while count > self.max_messages or size > self.max_bytes:
            seq, length = db.execute("SELECT seq, LENGTH(payload) FROM spool ORDER BY seq LIMIT 1").fetchone()
            db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            count, size, dropped = count - 1, size - length, dropped + 1
        return dropped

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (autocommit connection otherwise)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
