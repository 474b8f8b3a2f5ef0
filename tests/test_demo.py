"""`slmops demo` end to end: control plane, embedded broker, five real agents, three rollouts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_demo_runs_green(tmp_path: Path, broker: str) -> None:
    """Real agent processes: canary -> fleet succeeds, a latency regression rolls back by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    extra = (
        []
        if broker == "embedded"
        else ["--mqtt-url", "mqtt://127.0.0.1:1883", "--topic-prefix", f"slmops-test/{uuid.uuid4().hex[:10]}"]
    )
    result = subprocess.run(
        [sys.executable, "-m", "slmops", "demo", "--devices", "5", "--workdir", str(tmp_path / "demo"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "as expected" in out
    # v3 was rolled back by its latency gate, and every device ended on v2.
    assert "rolled_back" in out and "max_p95_latency_ratio" in out
    assert out.count("tinyllama@2.0.0") == 5, out[-3000:]
    # Signing is on by default: the devices themselves reported verifying every release they got.
    assert "each signed release was verified on every device it was sent to" in out, out[-3000:]
    # Nothing left running: every agent and the control plane were stopped.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
