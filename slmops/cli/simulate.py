"""`slmops simulate`: N simulated agents in one process, each a real MQTT connection and credential."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from slmops.cli.app import app

if TYPE_CHECKING:
    from slmops.simulate import Credential, SimConfig, SimFleet


@app.command()
def simulate(
    devices: Annotated[int, typer.Option("--devices", "-n", help="How many simulated agents.", min=1)] = 10,
    control_plane: Annotated[
        str, typer.Option("--control-plane", envvar="SLMOPS_SERVER", help="Control plane URL.")
    ] = "http://127.0.0.1:8080",
    token: Annotated[
        str | None, typer.Option("--token", envvar="SLMOPS_TOKEN", help="Admin API token (creates the devices).")
    ] = None,
    mqtt_url: Annotated[
        str | None, typer.Option(help="Broker URL (default: the one the control plane hands out at enrollment).")
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(help="JSON credentials file: used if it exists (no enrollment), else written after enrolling."),
    ] = None,
    apply_delay: Annotated[float, typer.Option(help="Seconds from a desired state to its result.", min=0)] = 0.5,
    failure_rate: Annotated[
        float, typer.Option(help="Chance a desired state ends in activation_failed.", min=0, max=1)
    ] = 0.0,
    telemetry_interval: Annotated[
        float, typer.Option(help="Seconds between telemetry windows (0: none).", min=0)
    ] = 10.0,
    latency_ms: Annotated[float, typer.Option(help="Mean request latency reported in telemetry.", min=0.1)] = 40.0,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")] = None,
    name_prefix: Annotated[str | None, typer.Option(help="Device name prefix (default: sim-<random>).")] = None,
) -> None:
    """Run a simulated fleet: enroll (or load) N devices, connect them, apply desired states, send telemetry."""
    from slmops.simulate import SimConfig, raise_fd_limit, run

    console = Console(stderr=True)
    limit = raise_fd_limit()
    if devices + 64 > limit:
        console.print(f"[yellow]{devices} devices need {devices} sockets; this process may open {limit}.")
    config = SimConfig(
        apply_delay_s=apply_delay,
        failure_rate=failure_rate,
        telemetry_interval_s=telemetry_interval or None,
        latency_ms=lambda _version: latency_ms,
    )
    creds = _credentials(console, credentials, devices, control_plane, token, mqtt_url, name_prefix)
    try:
        run(_run(console, creds, config, duration))
    except KeyboardInterrupt:
        console.print("stopped")


def _credentials(
    console: Console,
    path: Path | None,
    devices: int,
    control_plane: str,
    token: str | None,
    mqtt_url: str | None,
    name_prefix: str | None,
) -> list[Credential]:
    from slmops.simulate import enroll_fleet, load_credentials, run, save_credentials

    if path is not None and path.exists():
        creds = load_credentials(path, mqtt_url)
        if len(creds) < devices:
            raise typer.BadParameter(f"{path} holds {len(creds)} devices, fewer than --devices {devices}")
        return creds[:devices]
    if not token:
        raise typer.BadParameter("creating devices needs an admin token: pass --token or set SLMOPS_TOKEN")
    prefix = name_prefix or f"sim-{uuid.uuid4().hex[:6]}"
    with _progress(console, "enrolling") as (progress, task):
        creds = run(
            enroll_fleet(
                control_plane, token, devices, name_prefix=prefix, mqtt_url=mqtt_url,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        )  # fmt: skip
    if path is not None:
        save_credentials(path, creds)
        console.print(f"credentials of {len(creds)} devices written to {path}")
    return creds


async def _run(console: Console, creds: list[Credential], config: SimConfig, duration: float | None) -> None:
    from slmops.heap import settle_heap
    from slmops.simulate import SimFleet

    fleet = SimFleet(creds, config)
    with _progress(console, "connecting") as (progress, task):
        await fleet.start(progress=lambda done, total: progress.update(task, completed=done, total=total))
    settle_heap()  # the agents live as long as the process: full collections need not traverse them
    console.print(f"{len(creds)} devices connected (process {os.getpid()}); Ctrl-C stops them")
    try:
        await _report(console, fleet, duration)
    finally:
        await fleet.stop()
        console.print(_summary(fleet))


async def _report(console: Console, fleet: SimFleet, duration: float | None) -> None:
    loop = asyncio.get_running_loop()
    end = None if duration is None else loop.time() + duration
    while end is None or loop.time() < end:
        await asyncio.sleep(min(10.0, end - loop.time()) if end is not None else 10.0)
        console.print(_summary(fleet))


def _summary(fleet: SimFleet) -> str:
    s = fleet.stats
    versions = ", ".join(f"{v or 'none'}: {n}" for v, n in sorted(fleet.versions().items(), key=lambda kv: str(kv[0])))
    return (
        f"connected {s.connected}/{len(fleet.agents)}  applied {s.applied}  failed {s.failed}  "
        f"telemetry {s.telemetry_sent}  reconnects {s.connect_errors}  versions: {versions}"
    )


class _progress:
    """A rich progress bar for one counted step, on stderr."""

    def __init__(self, console: Console, what: str) -> None:
        self._bar = Progress(
            TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False
        )
        self._task = self._bar.add_task(what, total=None)

    def __enter__(self) -> tuple[Progress, TaskID]:
        self._bar.start()
        return self._bar, self._task

    def __exit__(self, *_: object) -> None:
        self._bar.stop()
