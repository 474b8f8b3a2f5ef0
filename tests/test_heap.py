"""settle_heap, in a process of its own (it changes the collector for the whole process)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
from slmops.heap import settle_heap
agents = [{"id": i} for i in range(5000)]  # long-lived objects, like a simulator's agents
before = gc.get_freeze_count()
settle_heap()
print(before, gc.get_freeze_count(), gc.get_threshold()[0])
"""


def test_long_lived_objects_are_frozen_and_young_collections_run_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True).stdout.split()
    before, frozen, threshold = map(int, out)
    assert before == 0 and frozen >= 5000  # the agents left the collected generations
    assert threshold == 50_000
