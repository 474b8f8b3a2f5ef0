"""The agent's failpoints: the documented example works, an unknown name stops the agent at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import edge_agent.failpoints as failpoints

PRINT_PAUSES = "import edge_agent.failpoints as f; print(sorted(f._PAUSES.items()))"


def _import_with(spec: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLMOPS_AGENT_FAILPOINTS": spec}
    return subprocess.run([sys.executable, "-c", PRINT_PAUSES], env=env, capture_output=True, text=True)


def test_the_documented_example_is_accepted() -> None:
    documented = re.search(r'SLMOPS_AGENT_FAILPOINTS="([^"]+)"', failpoints.__doc__ or "")
    assert documented is not None, "the module docstring shows an example"
    result = _import_with(documented.group(1))
    assert result.returncode == 0, result.stderr[-2000:]
    names = {item.split("=")[0] for item in documented.group(1).split(",")}
    assert names <= set(failpoints.POINTS)


def test_an_unknown_failpoint_is_refused() -> None:
    result = _import_with("download_started=2")
    assert result.returncode != 0
    assert "unknown failpoint 'download_started'" in result.stderr
