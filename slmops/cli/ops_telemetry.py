"""`slmops telemetry ...`: the fleet at a glance and latency/memory series per version or device."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli.app import app
from slmops.cli.ops_common import (
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    ago,
    api,
    console,
    emit_json,
    human_bytes,
    usage_error,
)

telemetry_app = typer.Typer(help="Fleet telemetry: summary, per-version and per-device series.", no_args_is_help=True)
app.add_typer(telemetry_app, name="telemetry")

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SinceOpt = Annotated[str, typer.Option(help="How far back: 30m, 6h, 2d.")]
StepOpt = Annotated[str, typer.Option(help="One point per step: 1m, 5m, 1h.")]


def _seconds(option: str, text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) < 1:
        usage_error("validation_error", f"{option} {text!r} is not a duration like 30s, 5m, 6h or 2d")
    return int(match[1]) * _UNIT_S[match[2]]


def _window(since: str, step: str) -> dict[str, Any]:
    start = datetime.now(UTC) - timedelta(seconds=_seconds("--since", since))
    return {"start": start.isoformat(), "step": f"{_seconds('--step', step)}s"}


@telemetry_app.command("summary")
def telemetry_summary(
    limit: Annotated[int, typer.Option(help="Most devices listed per section.", min=1, max=1000)] = 20,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Devices by status and version; who is offline, incompatible or not on its desired version, and why."""
    with api(server, token) as client:
        summary = client.get("/v1/telemetry/summary", limit=limit)
    if output is Output.json:
        emit_json(summary)
        return
    for renderable in _summary_view(summary):
        console.print(renderable)


def _summary_view(summary: dict[str, Any]) -> list[Any]:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())) or "none"
    rollouts = ", ".join(f"{k} {v}" for k, v in sorted(summary["rollouts_by_state"].items())) or "none"
    views: list[Any] = [
        f"[bold]{summary['devices']}[/bold] devices ({statuses}); rollouts: {rollouts}",
    ]
    versions = Table("model@version", "devices", "online", title="running")
    for row in summary["by_version"]:
        running = f"{row['model']}@{row['version']}" if row["version"] else "(nothing yet)"
        versions.add_row(running, str(row["devices"]), str(row["online"]))
    views.append(versions)
    offline = summary["offline"]
    if offline["count"]:
        table = Table("device", "last seen", title=f"{offline['count']} offline")
        for d in offline["devices"]:
            table.add_row(d["name"], ago(d["last_seen"]))
        views.append(table)
    drift = summary["not_on_desired"]
    if drift["count"]:
        table = Table(
            "device", "status", "running", "desired", "why", title=f"{drift['count']} not on their desired version"
        )
        for d in drift["devices"]:
            table.add_row(d["name"], d["status"], d["current_version"] or "-", d["desired_version"], d["reason"])
        views.append(table)
    incompatible = summary["incompatible"]
    if incompatible["count"]:
        table = Table("device", "rollout", "why", title=f"{incompatible['count']} incompatible")
        for d in incompatible["devices"]:
            table.add_row(d["name"], d["rollout_id"], d["reason"])
        views.append(table)
    return views


@telemetry_app.command("version")
def telemetry_version(
    model: str,
    version: str,
    since: SinceOpt = "1h",
    step: StepOpt = "5m",
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Latency percentiles, time to first token, tokens/s, memory and errors of a version, fleet-wide."""
    with api(server, token) as client:
        data = client.get("/v1/telemetry/versions", model=model, version=version, **_window(since, step))
    _print_series(data, f"{model}@{version}", output)


@telemetry_app.command("device")
def telemetry_device(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    since: SinceOpt = "1h",
    step: StepOpt = "5m",
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One device's telemetry over time."""
    with api(server, token) as client:
        data = client.get(f"/v1/telemetry/devices/{device_id}", **_window(since, step))
    _print_series(data, f"device {device_id}", output)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _print_series(data: dict[str, Any], what: str, output: Output) -> None:
    if output is Output.json:
        emit_json(data)
        return
    title = f"{what}, every {data['step_s']}s ({'+'.join(data['sources']) or 'no data'})"
    table = Table(
        "time (UTC)", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "ttft ms", "tok/s", "rss", title=title
    )
    for p in data["points"]:
        if not p["windows"]:
            continue  # quiet steps say nothing; the title gives the range
        table.add_row(
            str(p["t"])[11:19],
            str(p["requests"]),
            f"{p['errors']} ({p['error_rate'] or 0:.1%})",
            _ms(p["latency_p50_ms"]),
            _ms(p["latency_p95_ms"]),
            _ms(p["latency_p99_ms"]),
            _ms(p["ttft_ms"]),
            _ms(p["tokens_per_s"]),
            human_bytes(p["max_rss_bytes"]),
        )
    console.print(table if table.row_count else f"{what}: no telemetry in this range")
