"""`slmops rollout ...`: start staged rollouts, watch them live, promote, pause, resume, abort."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

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
    usage_error,
)

rollout_app = typer.Typer(help="Staged rollouts: canary -> waves -> fleet under telemetry gates.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

FINISHED = ("completed", "rolled_back", "aborted")
EXIT_NOT_COMPLETED = 3
MAX_DEVICE_ROWS = 12
_STAGE = re.compile(r"^(?P<name>[^:]+):(?P<size>\d+(?:\.\d+)?)(?P<pct>%?)(?::(?P<bake>\d+(?:\.\d+)?))?$")
_RESULT_STYLE = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
_STATE_STYLE = {
    "running": "cyan",
    "waiting_promotion": "yellow",
    "paused": "yellow",
    "completed": "green",
    "rolled_back": "red",
    "aborted": "red",
}


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
    limits = {
        "max_p95_latency_ratio": max_p95_ratio,
        "max_p95_latency_ms": max_p95_ms,
        "max_error_rate": max_error_rate,
        "max_rss_mb": max_rss_mb,
        "min_samples": min_samples,
    }
    body["gates"] = dict(body.get("gates") or {}) | {k: v for k, v in limits.items() if v is not None}
    with api(server, token) as client:
        rollout = client.post("/v1/rollouts", body)
    if output is Output.json:
        emit_json(rollout)
        return
    console.print(render_rollout(rollout))
    console.print(f"watch it: slmops rollout status {rollout['id']} --watch")


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
            _state(r["state"]),
            f"{r['stage_index'] + 1}/{len(r['stages'])} {r['stage']}",
            _counts(r["devices"]),
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
        if watch and output is Output.table:
            with Live(render_rollout(rollout), console=console, refresh_per_second=4) as live:
                while rollout["state"] not in FINISHED:
                    time.sleep(interval)
                    rollout = client.get(f"/v1/rollouts/{rollout_id}")
                    live.update(render_rollout(rollout))
        elif watch:
            while rollout["state"] not in FINISHED:
                time.sleep(interval)
                rollout = client.get(f"/v1/rollouts/{rollout_id}")
    if output is Output.json:
        emit_json(rollout)
    elif not watch:
        console.print(render_rollout(rollout))
    if watch and rollout["state"] != "completed":
        raise typer.Exit(EXIT_NOT_COMPLETED)


def _change(rollout_id: str, action: str, server: str | None, token: str | None, output: Output) -> None:
    with api(server, token) as client:
        rollout = client.post(f"/v1/rollouts/{rollout_id}/{action}")
    if output is Output.json:
        emit_json(rollout)
        return
    console.print(f"rollout {rollout['id']}: {_state(rollout['state'])}, stage {_stage_text(rollout)}")


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


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


def _counts(devices: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(devices.items())) or "-"


def _stage_text(rollout: dict[str, Any]) -> str:
    return f"{rollout['stage_index'] + 1}/{len(rollout['stages'])} {rollout['stage']}"


def _stage_size(stage: dict[str, Any]) -> str:
    size = f"{stage['percent']:g}%" if stage.get("percent") is not None else f"{stage.get('count')} device(s)"
    return f"{stage['name']} {size}, bake {stage.get('min_bake_s', 60):g}s"


def render_rollout(rollout: dict[str, Any]) -> RenderableType:
    """The status view: header, stage progress, devices per state, the last gate evaluation's checks."""
    stages = rollout["stages"]
    done = len(stages) if rollout["state"] == "completed" else rollout["stage_index"]
    header = Table.grid(padding=(0, 2))
    header.add_row("[bold]rollout[/bold]", rollout["id"])
    header.add_row("[bold]model[/bold]", f"{rollout['model']}@{rollout['version']}")
    header.add_row("[bold]baseline[/bold]", rollout.get("baseline_version") or "- (first rollout)")
    header.add_row("[bold]selector[/bold]", rollout["selector"] or "(every device)")
    header.add_row(
        "[bold]state[/bold]", _state(rollout["state"]) + (f"  {escape(rollout['reason'])}" if rollout["reason"] else "")
    )
    header.add_row(
        "[bold]stage[/bold]",
        f"{_stage_text(rollout)}  ({rollout['promotion']} promotion, started {ago(rollout.get('stage_started_at'))})",
    )
    header.add_row("[bold]plan[/bold]", " -> ".join(_stage_size(s) for s in stages))
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=len(stages), completed=done, width=40), Text(f"{done}/{len(stages)} stages done"))
    return Group(header, bar, _devices_table(rollout), _checks_table(rollout.get("last_evaluation")))


def _devices_table(rollout: dict[str, Any]) -> Table:
    """Devices per state; with few devices, one row each (stage, state, why), else the counts only."""
    details = rollout.get("device_details") or []
    total = sum(rollout["devices"].values())
    if not details or len(details) > MAX_DEVICE_ROWS:
        table = Table("device state", "count", title=f"{total} devices")
        for state, count in sorted(rollout["devices"].items()):
            table.add_row(state, str(count))
        return table
    table = Table("device", "stage", "state", "reason", title=f"{total} devices: {_counts(rollout['devices'])}")
    names = [s["name"] for s in rollout["stages"]]
    # stage_index -1: a target not yet assigned to a stage; listed last.
    for d in sorted(details, key=lambda d: (d["stage_index"] < 0, d["stage_index"], d["device_id"])):
        index = d["stage_index"]
        stage = names[index] if 0 <= index < len(names) else "-"
        table.add_row(d["device_id"], stage, d["status"], escape(d.get("reason") or ""))
    return table


def _checks_table(evaluation: dict[str, Any] | None) -> RenderableType:
    if not evaluation:
        return Text("no gate evaluation yet")
    result = evaluation["result"]
    title = f"last gate evaluation: [{_RESULT_STYLE.get(result, 'white')}]{result}[/] ({ago(evaluation['created_at'])})"
    table = Table("gate", "result", "value", "limit", title=title)
    for check in evaluation.get("details", {}).get("checks", []):
        style = _RESULT_STYLE.get(check.get("result", ""), "white")
        value = check.get("value")
        table.add_row(
            check.get("gate", "?"),
            f"[{style}]{check.get('result', '?')}[/]",
            "-" if value is None else f"{value:g}" if isinstance(value, int | float) else str(value),
            str(check.get("limit", "-")),
        )
    new = evaluation.get("details", {}).get("new") or {}
    if new:
        requests, errors, devices = (new.get(k, 0) for k in ("requests", "errors", "devices"))
        table.caption = f"new version: {requests} requests, {errors} errors on {devices} devices"
    return table
