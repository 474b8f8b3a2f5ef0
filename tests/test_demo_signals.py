"""`slmops demo` stops every process it started when it is told to stop (SIGTERM, SIGINT, SIGHUP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def _started_fleet(demo: subprocess.Popen[bytes], agents: int) -> list[psutil.Process]:
    """The demo's processes once its control plane and every agent are running."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert demo.poll() is None, "the demo exited before its agents started"
        children = psutil.Process(demo.pid).children(recursive=True)
        lines = [" ".join(child.cmdline()) for child in children if child.is_running()]
        if sum(" agent " in line for line in lines) == agents and any(line.endswith(" server") for line in lines):
            return children
        time.sleep(0.2)
    raise AssertionError("the demo did not start its control plane and agents")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_demo_stops_every_process_it_started(tmp_path: Path, stop: signal.Signals) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "slmops", "demo", "--devices", "2", "--workdir", str(tmp_path / "demo")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started: list[psutil.Process] = []
    try:
        started = _started_fleet(demo, agents=2)
        demo.send_signal(stop)
        output, _ = demo.communicate(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
        assert demo.returncode == 128 + stop, output[-2000:]  # it stopped on purpose, not killed by the signal
        assert "did not stop on SIGTERM" not in output, output[-2000:]  # each child stopped cleanly
    finally:
        for proc in [psutil.Process(demo.pid), *started] if demo.poll() is None else started:
            if proc.is_running():
                proc.kill()
