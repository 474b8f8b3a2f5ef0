"""Each package has one exception root, and every exception it defines derives from it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from control_plane.errors import ControlPlaneError
from edge_agent.errors import EdgeAgentError
from shared.errors import SharedError
from slmops.errors import SlmopsError

ROOT = Path(__file__).resolve().parent.parent
ROOTS: dict[str, type[Exception]] = {
    "shared": SharedError,
    "edge_agent": EdgeAgentError,
    "control_plane": ControlPlaneError,
    "slmops": SlmopsError,
}
# Subclasses of a framework's own exception, so that its handlers see them.
FRAMEWORK = {"BodyTooLarge", "PayloadTooLarge", "PacketTooLarge"}


def _defined_exceptions(package: str) -> list[tuple[str, str]]:
    """(module, class) for each public class whose name says it is an error, in the package's source."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.bases and not node.name.startswith("_"):
                bases = {ast.unparse(base) for base in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases) or node.name.endswith("Error"):
                    found.append((module, node.name))
    return found


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_derives_from_the_package_root(package: str) -> None:
    root = ROOTS[package]
    strays = []
    for module, name in _defined_exceptions(package):
        if name in FRAMEWORK:
            continue
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, root):
            strays.append(f"{module}.{name}")
    assert not strays, f"not under {root.__name__}: {strays}"


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_the_root_docstring_draws_every_exception(package: str) -> None:
    doc = importlib.import_module(ROOTS[package].__module__).__doc__ or ""
    names = {name for _, name in _defined_exceptions(package)} - {ROOTS[package].__name__}
    missing = sorted(name for name in names if name not in doc)
    assert not missing, f"{ROOTS[package].__module__}'s docstring does not draw {missing}"
