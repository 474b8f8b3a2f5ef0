"""The one way tests wait for something to happen: poll a check until it holds.

A generous deadline only turns a hang into a failure; nothing here times anything.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
WAIT_S = 60.0


def wait_for(
    check: Callable[[], T],
    timeout_s: float = WAIT_S,
    what: str | Callable[[], object] = "condition",
    *,
    interval_s: float = 0.05,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> T:
    """Poll `check()` until it returns a truthy value, and return that value.

    On timeout, raise AssertionError naming `what` (a function: called then, to show what was
    seen). `proc`: fail as soon as that process exits, with the tail of `log`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) waiting for {_describe(what)}\n{tail}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {_describe(what)}")
        time.sleep(interval_s)


def _describe(what: str | Callable[[], object]) -> str:
    return what if isinstance(what, str) else str(what())
