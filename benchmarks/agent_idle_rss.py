"""Benchmark 2: the agent's resident memory when idle with no model loaded (target <= 60 MB).

Starts the real daemon each way it is run (`python -m edge_agent` and `slmops agent` in the dev venv,
`slmops-agent` in an agent-only venv: a wheel installed with `slmops[agent]`), waits until it
answers /healthz and has settled, then reads RSS and USS (memory unique to the process).

    python benchmarks/agent_idle_rss.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.agent_venv import build_wheel, create_venv  # noqa: E402

TARGET_MB = 60.0
MiB = 1024 * 1024


def measure(command_for: str, agent_venv: Path, settle_s: float = 3.0) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp) / "data")
        if command_for == "slmops agent":
            agent.command = [str(Path(sys.executable).with_name("slmops")), "agent", "--config", str(agent.config)]
        elif command_for == "slmops-agent (agent)":
            agent.command = [str(agent_venv / "bin/slmops-agent"), "--config", str(agent.config)]
            agent.cwd = Path(tmp)
        agent.start()
        try:
            time.sleep(settle_s)
            assert agent.proc is not None
            info = psutil.Process(agent.proc.pid).memory_full_info()
            return info.rss / MiB, info.uss / MiB
        finally:
            agent.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        agent_venv = create_venv(Path(work) / "venv", build_wheel(Path(work)))
        print(f"{'entry point':<22}{'RSS MB':>10}{'USS MB':>10}{'target MB':>11}{'RSS/target':>12}")
        for entry in ("python -m edge_agent", "slmops agent", "slmops-agent (agent)"):
            rss, uss = measure(entry, agent_venv)
            verdict = "ok" if rss <= TARGET_MB else "over"
            print(f"{entry:<22}{rss:>10.1f}{uss:>10.1f}{TARGET_MB:>11.0f}{rss / TARGET_MB:>12.2f}  {verdict}")


if __name__ == "__main__":
    main()
