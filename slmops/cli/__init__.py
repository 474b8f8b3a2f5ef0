"""Command-line entry point `slmops`.

Each module below registers its commands on the groups in `slmops.cli.app` when imported. Heavy
imports (FastAPI, SQLAlchemy, llama_cpp, onnxruntime) happen inside the commands, so `slmops --help`
and the agent stay light.
"""

from __future__ import annotations

import importlib
import sys

_COMMAND_MODULES = ("server", "agent", "tiny", "ops", "demo", "simulate", "keys")
_AGENT_SUBCOMMANDS = {"apply", "rollback", "status"}


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"slmops.cli.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet must not break the rest
            if exc.name != f"slmops.cli.{name}":
                raise


def _is_agent_daemon(argv: list[str]) -> bool:
    """`slmops agent --config FILE [--log-json]`: the daemon itself, which systemd keeps running."""
    if not argv or argv[0] != "agent":
        return False
    rest = set(argv[1:])
    return not (rest & _AGENT_SUBCOMMANDS) and not (rest & {"--help", "-h"}) and ("--config" in rest or "-c" in rest)


def main() -> None:
    argv = sys.argv[1:]
    if _is_agent_daemon(argv):
        # Skip Typer and rich for the long-running daemon on small devices (docs/performance.md#agent).
        from edge_agent.__main__ import main as agent_main

        sys.argv = ["slmops agent", *("--config" if a == "-c" else a for a in argv[1:])]
        sys.exit(agent_main())
    try:
        from slmops.cli.app import app
    except ModuleNotFoundError as exc:  # an agent-only install (`slmops[agent]`) has no Typer
        if exc.name not in ("typer", "rich", "click"):
            raise
        sys.stderr.write(
            "slmops: the operator CLI needs the cli extra: pip install 'slmops[cli]'\n"
            "the agent daemon runs without it: slmops-agent --config FILE (or slmops agent --config FILE)\n"
        )
        sys.exit(2)
    _register()
    app()
