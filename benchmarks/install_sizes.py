"""Disk size of each install: a fresh venv per set of extras, from a wheel of this checkout.

Each venv is made without pip (about 10 MB more where a user's venv has it); `gguf` installs the
portable llama-cpp-python wheel that .ci/install-llama-cpp keeps. The dev venv (./.venv: every
extra, llama.cpp and the test tools) is listed for comparison.

    python benchmarks/install_sizes.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.agent_venv import REPO, build_wheel, create_venv, installed_distributions  # noqa: E402

EXTRAS = ("agent", "agent,cli", "agent,gguf", "agent,onnx", "server", "server,s3")
LLAMA_WHEELS = sorted(Path(os.environ.get("SLMOPS_WHEEL_CACHE", Path.home() / ".cache/slmops/wheels")).glob("llama-*"))
MiB = 1024 * 1024


def size_mb(folder: Path) -> float:
    """Disk space used under `folder`, as `du -s` counts it (blocks; hard links once)."""
    seen: set[int] = set()
    blocks = 0
    for path in [folder, *folder.rglob("*")]:
        stat = path.lstat()
        if stat.st_ino not in seen:
            seen.add(stat.st_ino)
            blocks += stat.st_blocks
    return blocks * 512 / MiB


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        wheel = build_wheel(Path(work))
        print(f"{'install':<24}{'MB':>8}{'packages':>10}")
        for extras in EXTRAS:
            venv = create_venv(Path(work) / extras, wheel, extras, find_links=LLAMA_WHEELS)
            print(f"{'slmops[' + extras + ']':<24}{size_mb(venv):>8.0f}{len(installed_distributions(venv)):>10}")
    dev = REPO / ".venv"
    print(f"{'dev venv (bootstrap.sh)':<24}{size_mb(dev):>8.0f}{len(installed_distributions(dev)):>10}")


if __name__ == "__main__":
    main()
