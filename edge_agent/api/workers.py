"""Long-lived daemon threads that run generations, so each request does not start a thread of its own.

llama.cpp's CPU backend keeps an OpenMP thread team per calling thread: a generation on a fresh
thread pays for a new team before its first token (about 1 ms per request with SmolLM2 on 2
threads; docs/performance.md, "lean agent"). Requests are served one at a time, so one idle worker
is nearly always there; another starts only while every worker is busy (a cancelled stream still
finishing its token), and workers beyond `max_idle` exit instead of waiting. Workers are daemon
threads: a native call that never returns cannot hold the process at exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class Workers:
    def __init__(self, *, name: str, max_idle: int = 1) -> None:
        self._name = name
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self.started = 0  # threads started so far (tests read it)

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` on an idle worker, or on a new one when all are busy; returns at once."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self.started += 1
        if inbox is not None:
            inbox.put(job)
            return
        inbox = queue.SimpleQueue()
        inbox.put(job)
        threading.Thread(target=self._serve, args=(inbox,), name=self._name, daemon=True).start()

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            job = inbox.get()
            job()  # jobs handle their own errors: a worker never dies of one
            del job  # drop the finished request's frames before waiting for the next
            with self._lock:
                if len(self._idle) >= self._max_idle:
                    return
                self._idle.append(inbox)
