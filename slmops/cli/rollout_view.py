"""The rollout status view shared by `rollout status`, `--watch` and `rollout create`."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from slmops.cli.ops_common import ago

MAX_DEVICE_ROWS = 12
_RESULT_STYLE = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
_STATE_STYLE = {
    "running": "cyan",
    "waiting_promotion": "yellow",
    "paused": "yellow",
    "completed": "green",
    "rolled_back": "red",
    "aborted": "red",
}


def state_text(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


def counts_text(devices: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(devices.items())) or "-"


def stage_text(rollout: dict[str, Any]) -> str:
    return f"{rollout['stage_index'] + 1}/{len(rollout['stages'])} {rollout['stage']}"


def _stage_size(stage: dict[str, Any]) -> str:
    size = f"{stage['percent']:g}%" if stage.get("percent") is not None else f"{stage.get('count')} device(s)"
    return f"{stage['name']} {size}, bake {stage.get('min_bake_s', 60):g}s"


def render_rollout(rollout: dict[str, Any], note: str | None = None) -> RenderableType:
    """The status view: header, stage progress, devices per state, the last gate evaluation's checks."""
    stages = rollout["stages"]
    done = len(stages) if rollout["state"] == "completed" else rollout["stage_index"]
    reason = f"  {escape(rollout['reason'])}" if rollout["reason"] else ""
    started = ago(rollout.get("stage_started_at"))
    header = Table.grid(padding=(0, 2))
    for key, value in (
        ("rollout", rollout["id"]),
        ("model", f"{rollout['model']}@{rollout['version']}"),
        ("baseline", rollout.get("baseline_version") or "- (first rollout)"),
        ("selector", rollout["selector"] or "(every device)"),
        ("state", state_text(rollout["state"]) + reason),
        ("stage", f"{stage_text(rollout)}  ({rollout['promotion']} promotion, started {started})"),
        ("plan", " -> ".join(_stage_size(s) for s in stages)),
    ):
        header.add_row(f"[bold]{key}[/bold]", value)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=len(stages), completed=done, width=40), Text(f"{done}/{len(stages)} stages done"))
    parts: list[RenderableType] = [header, bar, _devices_table(rollout), _checks_table(rollout.get("last_evaluation"))]
    if rollout["state"] == "waiting_promotion":
        parts.append(Text(f"gates passed: promote with `slmops rollout promote {rollout['id']}`", style="bold yellow"))
    if note:
        parts.append(Text(note, style="bold red"))
    return Group(*parts)


def _devices_table(rollout: dict[str, Any]) -> Table:
    """Devices per state; with few devices, one row each (stage, state, why), else the counts only."""
    details = rollout.get("device_details") or []
    total = sum(rollout["devices"].values())
    if not details or len(details) > MAX_DEVICE_ROWS:
        table = Table("device state", "count", title=f"{total} devices")
        for state, count in sorted(rollout["devices"].items()):
            table.add_row(state, str(count))
        return table
    table = Table("device", "stage", "state", "reason", title=f"{total} devices: {counts_text(rollout['devices'])}")
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
            _number(value),
            str(check.get("limit", "-")),
        )
    new = evaluation.get("details", {}).get("new") or {}
    if new:
        requests, errors, devices = (new.get(k, 0) for k in ("requests", "errors", "devices"))
        table.caption = f"new version: {requests} requests, {errors} errors on {devices} devices"
    return table


def evaluations_table(rollout: dict[str, Any], evaluations: list[dict[str, Any]]) -> Table:
    names = [s["name"] for s in rollout["stages"]]
    title = f"gate evaluations of {rollout['model']}@{rollout['version']} ({state_text(rollout['state'])})"
    table = Table("when", "stage", "result", "checks (value / limit)", "requests", title=title)
    for evaluation in evaluations:
        index = evaluation["stage_index"]
        details = evaluation.get("details") or {}
        checks = "; ".join(
            f"[{_RESULT_STYLE.get(c.get('result', ''), 'white')}]{c.get('gate')}[/] {_number(c.get('value'))} / "
            f"{_number(c.get('limit'))}"
            for c in details.get("checks", [])
        )
        result = evaluation["result"]
        table.add_row(
            ago(evaluation["created_at"]),
            names[index] if 0 <= index < len(names) else str(index),
            f"[{_RESULT_STYLE.get(result, 'white')}]{result}[/]",
            checks or "-",
            str((details.get("new") or {}).get("requests", "-")),
        )
    return table


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, int | float) else str(value)
