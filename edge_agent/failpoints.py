"""Named pauses at the reconcile loop's crash-relevant steps, for kill -9 tests.

`SLMOPS_AGENT_FAILPOINTS="activation_loaded=5,trial_started=2"` makes the agent sleep that many
seconds when it reaches the named step, so a test can kill it exactly there. Unset (production),
`reached` is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

POINTS = ("activation_started", "activation_loaded", "trial_started")


def _parse(spec: str) -> dict[str, float]:
    pauses: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, seconds = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        pauses[name] = float(seconds or 0)
    return pauses


_PAUSES = _parse(os.environ.get("SLMOPS_AGENT_FAILPOINTS", ""))


def reached(name: str) -> None:
    seconds = _PAUSES.get(name)
    if seconds:
        log.warning("failpoint %s: pausing %.1f s", name, seconds)
        time.sleep(seconds)
