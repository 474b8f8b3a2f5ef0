"""Where desired state comes from. The reconcile loop does not care: every source calls `submit`.

This module has the watched-file source; the MQTT channel is another source with the same shape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from shared.desired import DesiredState

log = logging.getLogger(__name__)

Submit = Callable[[DesiredState], object]


class DesiredStateSource(Protocol):
    def start(self, submit: Submit) -> None: ...

    def stop(self) -> None: ...


def read_desired(path: Path) -> DesiredState:
    """Parse a desired-state JSON file; raises ValueError with pydantic's explanation."""
    try:
        return DesiredState.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ValueError(f"{path} is not a valid desired state: {exc}") from exc


class WatchedFileSource:
    """Polls a file's (mtime, size, inode); a change that parses is submitted, one that does not is logged.

    Polling rather than inotify: it works on every filesystem, and the file is written atomically
    (rename), so a half-written file is never read.
    """

    def __init__(self, path: Path, *, interval_s: float = 1.0) -> None:
        self.path = path
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[int, int, int] | None = None

    def start(self, submit: Submit) -> None:
        self._thread = threading.Thread(target=self._run, args=(submit,), name="desired-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, submit: Submit) -> None:
        while not self._stop.is_set():
            self.poll(submit)
            self._stop.wait(self.interval_s)

    def poll(self, submit: Submit) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._seen:
            return
        self._seen = signature
        try:
            desired = read_desired(self.path)
        except (OSError, ValueError) as exc:
            log.error("ignoring desired-state file: %s", exc)
            return
        submit(desired)
