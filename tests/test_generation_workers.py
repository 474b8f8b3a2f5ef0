"""The agent's generation workers: one long-lived thread serves request after request."""

from __future__ import annotations

import threading

from edge_agent.api.workers import Workers


def _run(workers: Workers, job) -> threading.Event:
    done = threading.Event()

    def wrapped() -> None:
        try:
            job()
        finally:
            done.set()

    workers.run(wrapped)
    return done


def _finished_and_parked(workers: Workers, done: threading.Event) -> None:
    assert done.wait(10)
    for _ in range(1000):  # the worker parks itself just after the job returns
        with workers._lock:
            if workers._idle:
                return
        threading.Event().wait(0.001)


def test_sequential_jobs_run_on_one_thread() -> None:
    workers = Workers(name="test-generate")
    threads: list[int] = []
    for _ in range(5):
        _finished_and_parked(workers, _run(workers, lambda: threads.append(threading.get_ident())))
    assert len(set(threads)) == 1
    assert workers.started == 1


def test_a_job_while_the_worker_is_busy_gets_a_thread_of_its_own() -> None:
    workers = Workers(name="test-busy", max_idle=1)
    release = threading.Event()
    threads: list[int] = []
    busy = _run(workers, lambda: (threads.append(threading.get_ident()), release.wait(10)))
    second = _run(workers, lambda: threads.append(threading.get_ident()))
    assert second.wait(10)  # not queued behind the busy one
    release.set()
    assert busy.wait(10)
    assert len(set(threads)) == 2 and workers.started == 2
    for _ in range(1000):  # one parks, the other exits: at most max_idle idle workers
        if sum(t.name == "test-busy" for t in threading.enumerate()) == 1:
            break
        threading.Event().wait(0.001)
    assert sum(t.name == "test-busy" for t in threading.enumerate()) == 1
    assert len(workers._idle) == 1
