"""An agent-only install: a wheel of this checkout in a fresh venv with `slmops[agent]` and nothing else.

The venv is new on every call (so the extras are resolved from the wheel's metadata each time); the
wheels of its dependencies are kept in ~/.cache/slmops/agent-wheels/<key>, keyed by pyproject.toml
and the Python version, so only the first run needs a package index. Their versions are pinned to
the dev venv's, the ones the rest of the suite runs on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEEL_CACHE = Path(os.environ.get("SLMOPS_WHEEL_CACHE", Path.home() / ".cache/slmops/wheels")).parent / "agent-wheels"
SOURCES = ("pyproject.toml", "README.md", "shared", "edge_agent", "control_plane", "slmops")


def build_wheel(dest: Path) -> Path:
    """A wheel of the working tree, built from a copy so no build/ or egg-info is left behind."""
    src = dest / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dest, src])
    (wheel,) = dest.glob("slmops-*.whl")
    return wheel


def _cache_key() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:12]


def _dev_pins(dest: Path) -> Path:
    """The dev venv's versions as a constraints file (editable and local builds left out)."""
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    pins = [line for line in frozen.splitlines() if "==" in line and " @ " not in line]
    path = dest / "dev-pins.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def dependency_wheels(wheel: Path, extras: str = "agent", find_links: Sequence[Path] = ()) -> Path:
    """A folder with the wheels `<wheel>[extras]` needs, downloaded once per pyproject.toml."""
    folder = WHEEL_CACHE / f"{extras}-{_cache_key()}"
    if folder.is_dir():
        return folder
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEEL_CACHE) as tmp:
        staging = Path(tmp) / "wheels"
        pins = _dev_pins(Path(tmp))
        links = [arg for folder in find_links for arg in ("--find-links", folder)]
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "-d", staging,
              "-c", pins, *links, f"slmops[{extras}] @ {wheel.as_uri()}"])  # fmt: skip
        for own in staging.glob("slmops-*.whl"):
            own.unlink()
        try:
            staging.rename(folder)
        except OSError:  # another run filled the cache first
            if not folder.is_dir():
                raise
    _prune(extras, keep=folder)
    return folder


def _prune(extras: str, keep: Path, max_age_s: float = 86400) -> None:
    """Drop this extras' wheel folders made for other pyproject.toml versions more than a day ago."""
    for old in WHEEL_CACHE.glob(f"{extras}-*"):
        if old != keep and old.name.rpartition("-")[0] == extras and time.time() - old.stat().st_mtime > max_age_s:
            shutil.rmtree(old, ignore_errors=True)


def create_venv(
    venv: Path, wheel: Path, extras: str = "agent", *, with_pip: bool = False, find_links: Sequence[Path] = ()
) -> Path:
    """A new venv at `venv` holding `<wheel>[extras]`, installed offline from the cached wheels.

    `find_links`: folders with wheels no index has (the portable llama-cpp-python build)."""
    wheels = dependency_wheels(wheel, extras, find_links)
    _run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index",
          "--find-links", wheels, f"slmops[{extras}] @ {wheel.as_uri()}"])  # fmt: skip
    return venv


def run_python(venv: Path, code: str) -> str:
    """What `code` prints, run by the venv's Python from inside the venv (away from this checkout)."""
    return _run([venv / "bin" / "python", "-c", code], cwd=venv).stdout


def installed_distributions(venv: Path) -> set[str]:
    """Normalised names (PEP 503) of every distribution installed in `venv`."""
    names = run_python(venv, "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))")
    return {name.lower().replace("_", "-").replace(".", "-") for name in names.split()}


def clean_env() -> dict[str, str]:
    """The environment for a process of the venv: nothing that would reach this checkout's code."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(command: list[str | Path], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=clean_env())
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {done.returncode}\n{done.stderr[-3000:]}")
    return done
