"""The layer contracts in pyproject.toml hold, and they catch a crossed wall."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "edge_agent", "control_plane", "slmops")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [str(Path(sys.executable).with_name("lint-imports"))]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def _tree_with(tmp_path: Path, module: str, line: str) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


def test_the_agent_importing_the_control_plane_breaks_the_layers(tmp_path: Path) -> None:
    tree = _tree_with(tmp_path, "edge_agent/settings.py", "from control_plane import db  # noqa")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "edge_agent is not allowed to import control_plane" in result.stdout


def test_the_server_reaching_agent_code_through_the_cli_breaks_the_layers(tmp_path: Path) -> None:
    tree = _tree_with(tmp_path, "control_plane/config.py", "from slmops.cli import agent  # noqa")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "control_plane is not allowed to import slmops" in result.stdout


def test_the_agent_importing_a_server_library_breaks_its_contract(tmp_path: Path) -> None:
    tree = _tree_with(tmp_path, "edge_agent/settings.py", "import sqlmodel  # noqa")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "edge_agent is not allowed to import sqlmodel" in result.stdout
