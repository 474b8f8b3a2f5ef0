"""Garbage-collector settings for the long-running processes that handle a fleet's messages."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Once a process's long-lived objects exist (a server's modules, mappers and schemas; a
    simulator's connected agents): move them to the permanent generation, and run young
    collections every 50,000 allocations instead of 700.

    The fleet paths allocate a dict per row and per message by the thousand: with the defaults, a
    run of benchmarks/rollout_convergence.py (five 1,000-device rollouts) triggered 369 young
    collections in the server and two full ones of ~150 ms each, which traversed every start-up
    object again (measured with gc.callbacks); with these settings, one young collection. A
    simulator holding 10,000 agents has more still to traverse.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
