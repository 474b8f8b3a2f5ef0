"""Exactly one controller per database: a PostgreSQL advisory lock, or a file lock for SQLite.

Every replica runs the API and ingest; only the lock holder runs the rollout controller and the
desired-state publisher. The PostgreSQL lock lives as long as the holder's session, so a crashed
replica releases it and another takes over on its next try.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import sqlalchemy as sa

LOCK_KEY = 0x510_0AE5  # arbitrary, fixed: "slmops controller"


class LeaderLock:
    def __init__(self, engine: sa.Engine, data_dir: Path) -> None:
        self._engine = engine
        self._data_dir = data_dir
        self._conn: sa.Connection | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fd is not None

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self._engine.dialect.name == "postgresql":
            conn = self._engine.connect()
            got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
            conn.commit()
            if got:
                self._conn = conn
            else:
                conn.close()
            return got
        self._data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._data_dir / "controller.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
