"""`slmops rollout ...`: start staged rollouts, watch them live, promote, pause, resume, abort."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli.app import app
from slmops.cli.client import ApiClient, ApiError, new_idempotency_key
from slmops.cli.ops_common import (
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    ago,
    api,
    console,
    emit_json,
    err,
    usage_error,
)
from slmops.cli.rollout_view import counts_text, evaluations_table, render_rollout, stage_text, state_text

rollout_app = typer.Typer(help="Staged rollouts: canary -> waves -> fleet under telemetry gates.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

FINISHED = ("completed", "rolled_back", "aborted")
EXIT_NOT_COMPLETED = 3
EXIT_INTERRUPTED = 130  # as a shell reports a process stopped by SIGINT
_STAGE = re.compile(r"^(?P<name>[^:]+):(?P<size>\d+(?:\.\d+)?)(?P<pct>%?)(?::(?P<bake>\d+(?:\.\d+)?))?$")


def parse_stage(text: str) -> dict[str, Any]:
    """`canary:5%:60` (percent, bake seconds) or `first:2:30` (device count); the bake part is optional."""
    match = _STAGE.match(text.strip())
    if not match:
        usage_error("validation_error", f"--stage {text!r} is not name:percent%[:bake_s] or name:count[:bake_s]")
    stage: dict[str, Any] = {"name": match["name"]}
    size = float(match["size"])
    if match["pct"]:
        stage["percent"] = size
    else:
        stage["count"] = int(size)
    if match["bake"] is not None:
        stage["min_bake_s"] = float(match["bake"])
    return stage


def _read_plan(path: Path) -> dict[str, Any]:
    """A plan file: a JSON list of stages, or an object with stages, gates, promotion, selector."""
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        usage_error("validation_error", f"cannot read the plan {path}: {exc}")
    if isinstance(plan, list):
        return {"stages": plan}
    if not isinstance(plan, dict):
        usage_error("validation_error", f"the plan {path} must be a JSON list of stages or an object")
    return plan


@rollout_app.command("create")
def rollout_create(
    model: str,
    version: str,
    selector: Annotated[str | None, typer.Option(help="Target devices by label, e.g. region=eu (default all).")] = None,
    plan: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="JSON plan file.")] = None,
    stage: Annotated[
        list[str] | None, typer.Option(help="name:percent%:bake_s or name:count:bake_s, repeatable, in order.")
    ] = None,
    manual: Annotated[bool, typer.Option("--manual", help="Wait for `rollout promote` between stages.")] = False,
    max_p95_ratio: Annotated[float | None, typer.Option(help="Max p95 latency / baseline p95.")] = None,
    max_p95_ms: Annotated[float | None, typer.Option(help="Max p95 latency in ms.")] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Max share of failed requests, 0..1.")] = None,
    max_rss_mb: Annotated[float | None, typer.Option(help="Max resident memory in MB.")] = None,
    min_samples: Annotated[int | None, typer.Option(help="Requests needed before latency gates decide.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start even below the quality floor.")] = False,
    min_quality_retention: Annotated[
        float | None, typer.Option(help="Quality floor, 0..1 of the parent (server default 0.9).", min=0, max=1)
    ] = None,
    window: Annotated[
        list[str] | None, typer.Option(help="Daily maintenance window HH:MM-HH:MM, repeatable (device label tz=...).")
    ] = None,
    timezone: Annotated[str | None, typer.Option(help="Timezone of the windows (default UTC).")] = None,
    max_per_minute: Annotated[int | None, typer.Option(help="At most this many devices a minute.", min=1)] = None,
    abort_percent: Annotated[float | None, typer.Option(help="Abort at this % of failed activations.")] = None,
    abort_min_failed: Annotated[int, typer.Option(help="... counted from this many failures on.", min=1)] = 1,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Roll MODEL VERSION out in stages (default canary 5% -> 25% -> 100%, automatic promotion)."""
    body: dict[str, Any] = _read_plan(plan) if plan else {}
    body |= {"model": model, "version": version}
    if selector is not None:
        body["selector"] = selector
    if stage:
        body["stages"] = [parse_stage(s) for s in stage]
    if manual:
        body["promotion"] = "manual"
    if force:
        body["force"] = True
    if min_quality_retention is not None:
        body["min_quality_retention"] = min_quality_retention
    limits = {
        "max_p95_latency_ratio": max_p95_ratio,
        "max_p95_latency_ms": max_p95_ms,
        "max_error_rate": max_error_rate,
        "max_rss_mb": max_rss_mb,
        "min_samples": min_samples,
    }
    body["gates"] = dict(body.get("gates") or {}) | {k: v for k, v in limits.items() if v is not None}
    body |= _schedule(window, timezone, max_per_minute, abort_percent, abort_min_failed)
    with api(server, token) as client:
        rollout = client.post("/v1/rollouts", body, idempotency_key=new_idempotency_key())
    if output is Output.json:
        emit_json(rollout)
        return
    console.print(render_rollout(rollout))
    console.print(f"watch it: slmops rollout status {rollout['id']} --watch")


def _schedule(
    windows: list[str] | None, timezone: str | None, max_per_minute: int | None, percent: float | None, min_failed: int
) -> dict[str, Any]:
    """The plan's maintenance windows, rate and abort threshold, from the command line."""
    out: dict[str, Any] = {}
    if windows:
        spans = [w.partition("-") for w in windows]
        if any(not sep for _, sep, _ in spans):
            usage_error("validation_error", "a --window is HH:MM-HH:MM, e.g. 01:00-05:00")
        out["maintenance"] = {"windows": [{"start": a, "end": b} for a, _, b in spans], "timezone": timezone or "UTC"}
    if max_per_minute is not None:
        out["max_per_minute"] = max_per_minute
    if percent is not None:
        out["abort"] = {"failed_percent": percent, "min_failed": min_failed}
    return out


@rollout_app.command("list")
def rollout_list(
    state: Annotated[str | None, typer.Option(help="Only rollouts in this state.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List rollouts, newest last."""
    with api(server, token) as client:
        rollouts = client.get_all("/v1/rollouts", state=state)
    if output is Output.json:
        emit_json(rollouts)
        return
    table = Table("id", "model@version", "state", "stage", "devices", "created", title=f"{len(rollouts)} rollouts")
    for r in rollouts:
        table.add_row(
            r["id"],
            f"{r['model']}@{r['version']}",
            state_text(r["state"]),
            f"{r['stage_index'] + 1}/{len(r['stages'])} {r['stage']}",
            counts_text(r["devices"]),
            ago(r["created_at"]),
        )
    console.print(table)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live until the rollout finishes.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", min=0.05)] = 1.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show a rollout: state, stage, devices per state, the last gate checks.

    With --watch, exits when the rollout finishes: 0 when completed, 3 when rolled back or aborted.
    """
    with api(server, token) as client:
        rollout = client.get(f"/v1/rollouts/{rollout_id}")
        if watch:
            rollout = _watch(client, rollout, interval, live=output is Output.table)
    if output is Output.json:
        emit_json(rollout)
    elif not watch:
        console.print(render_rollout(rollout))
    if watch and rollout["state"] != "completed":
        raise typer.Exit(EXIT_NOT_COMPLETED)


def _watch(client: ApiClient, rollout: dict[str, Any], interval: float, *, live: bool) -> dict[str, Any]:
    """Poll until the rollout finishes; an unreachable control plane (a restart) is waited out, not fatal."""
    from rich.live import Live

    view = Live(render_rollout(rollout), console=console, refresh_per_second=4) if live else None
    try:
        with view or contextlib.nullcontext():
            while rollout["state"] not in FINISHED:
                time.sleep(interval)
                note = None
                try:
                    rollout = client.get(f"/v1/rollouts/{rollout['id']}")
                except ApiError as exc:
                    if exc.code != "connection_failed":
                        raise
                    note = f"control plane unreachable since {time.strftime('%H:%M:%S')}; still trying"
                if view is not None:
                    view.update(render_rollout(rollout, note))
    except KeyboardInterrupt:
        err.print(f"stopped watching; the rollout goes on (slmops rollout status {rollout['id']})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    return rollout


@rollout_app.command("evaluations")
def rollout_evaluations(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    limit: Annotated[int, typer.Option(help="How many, newest first.", min=1, max=1000)] = 20,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """The gate evaluations of a rollout, newest first, with the numbers that decided each."""
    with api(server, token) as client:
        rollout = client.get(f"/v1/rollouts/{rollout_id}")
        evaluations = client.get(f"/v1/rollouts/{rollout_id}/evaluations", limit=limit)
    if output is Output.json:
        emit_json(evaluations)
        return
    console.print(evaluations_table(rollout, evaluations))


def _change(rollout_id: str, action: str, server: str | None, token: str | None, output: Output) -> None:
    with api(server, token) as client:
        rollout = client.post(f"/v1/rollouts/{rollout_id}/{action}")
    if output is Output.json:
        emit_json(rollout)
        return
    console.print(f"rollout {rollout['id']}: {state_text(rollout['state'])}, stage {stage_text(rollout)}")


@rollout_app.command("promote")
def rollout_promote(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Move to the next stage now (manual plans wait for this after their gates pass)."""
    _change(rollout_id, "promote", server, token, output)


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Hold the rollout where it is (devices keep what they have)."""
    _change(rollout_id, "pause", server, token, output)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Continue a paused rollout."""
    _change(rollout_id, "resume", server, token, output)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Stop the rollout and return every touched device to its previous version."""
    _change(rollout_id, "abort", server, token, output)
