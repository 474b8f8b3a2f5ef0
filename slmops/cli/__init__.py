"""Command-line entry point `slmops`.

Each module below registers its commands on the groups in `slmops.cli.app` when imported. Heavy
imports (FastAPI, SQLAlchemy, llama_cpp, onnxruntime) happen inside the commands, so `slmops --help`
and the agent stay light.
"""

from __future__ import annotations

import importlib

from slmops.cli.app import app

_COMMAND_MODULES = ("server", "agent", "tiny", "ops", "demo", "simulate")


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"slmops.cli.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet must not break the rest
            if exc.name != f"slmops.cli.{name}":
                raise


def main() -> None:
    _register()
    app()
