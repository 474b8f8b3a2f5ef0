"""`slmops demo`: the control plane, real agents, three rollouts (one rolled back), a summary."""

from __future__ import annotations

import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slmops.cli.app import app


class DemoModel(StrEnum):
    tiny = "tiny"
    smollm2 = "smollm2"


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="How many agent processes to run.", min=2, max=20)] = 5,
    keep: Annotated[bool, typer.Option("--keep", help="Leave everything running; print the URLs.")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Where to put data and logs (default: a temp dir).")] = None,
    mqtt_url: Annotated[
        str | None, typer.Option(help="Use this broker (e.g. Mosquitto) instead of the embedded one.")
    ] = None,
    topic_prefix: Annotated[str, typer.Option(help="MQTT topic prefix.")] = "slmops/v1",
    model: Annotated[
        DemoModel, typer.Option(help="tiny: generated models (under a minute); smollm2: SmolLM2-135M from PyPI.")
    ] = DemoModel.tiny,
) -> None:
    """Run a whole fleet on this machine: v1 to all, v2 canary -> fleet, v3 regresses and rolls back."""
    from slmops.demo import run_demo
    from slmops.demo_smollm2 import run_smollm2_demo

    runner = run_smollm2_demo if model is DemoModel.smollm2 else run_demo

    # Wide enough for the summary table when the output is a log rather than a terminal.
    console = Console(width=None if sys.stdout.isatty() else 140)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        raise typer.Exit(runner(workdir.resolve(), devices, keep, console, mqtt_url, topic_prefix))
    with tempfile.TemporaryDirectory(prefix="slmops-demo-") as tmp:
        raise typer.Exit(runner(Path(tmp), devices, keep, console, mqtt_url, topic_prefix))
