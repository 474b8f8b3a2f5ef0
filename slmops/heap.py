"""Garbage-collector settings for the long-running processes that handle a fleet's messages."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Once a process's long-lived objects exist (a server's modules, mappers and schemas; a
    simulator's connected agents): move them to the permanent generation, and run young
    collections every 50,000 allocations instead of 700: the fleet paths allocate by the thousand,
    and start-up objects never become garbage (ADR 0005).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
