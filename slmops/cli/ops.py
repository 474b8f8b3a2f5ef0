"""Operator commands over the control plane's REST API: `slmops model ...`, `slmops device ...`.

`model push` lives in `ops_push` and the rollout commands in `ops_rollout`; importing this module
registers them all.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli import ops_lifecycle, ops_push, ops_rollout, ops_telemetry  # noqa: F401  (registers commands)
from slmops.cli.app import app, device_app, model_app
from slmops.cli.client import config_path, new_idempotency_key
from slmops.cli.ops_common import (
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    ago,
    api,
    artifacts_table,
    console,
    emit_json,
    labels_text,
    metrics_text,
    parse_labels,
)


@model_app.command("create")
def model_create(
    name: str,
    description: Annotated[str, typer.Option(help="What the model is for.")] = "",
    task: Annotated[str, typer.Option(help="Task, e.g. text-generation.")] = "text-generation",
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Register a model NAME in the registry (versions are pushed to it)."""
    with api(server, token) as client:
        body = {"name": name, "description": description, "task": task}
        model = client.post("/v1/models", body, idempotency_key=new_idempotency_key())
    if output is Output.json:
        emit_json(model)
        return
    console.print(f"created model [bold]{model['name']}[/bold] (id {model['id']})")
    console.print(f"next: slmops model push {model['name']} VERSION FILE")


@model_app.command("list")
def model_list(server: ServerOpt = None, token: TokenOpt = None, output: OutputOpt = Output.table) -> None:
    """List the registered models."""
    with api(server, token) as client:
        models = client.get_all("/v1/models")
    if output is Output.json:
        emit_json(models)
        return
    table = Table("name", "task", "description", "created", "by", title=f"{len(models)} models")
    for m in models:
        table.add_row(m["name"], m["task"], m["description"] or "-", ago(m["created_at"]), m["created_by"])
    console.print(table)


@model_app.command("show")
def model_show(
    name: str,
    version: Annotated[str | None, typer.Argument(help="One version (default: every version).")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show a model's versions with their artifacts, lineage and metrics."""
    with api(server, token) as client:
        model = client.get(f"/v1/models/{name}")
        if version is not None:
            versions = [client.get(f"/v1/models/{name}/versions/{version}")]
        else:
            versions = client.get_all(f"/v1/models/{name}/versions")
    if output is Output.json:
        emit_json(versions[0] if version is not None else {"model": model, "versions": versions})
        return
    console.print(f"[bold]{model['name']}[/bold]  task {model['task']}  {model['description']}")
    console.print(_versions_table(versions))
    console.print(artifacts_table(versions))


def _lineage(version: dict[str, Any]) -> str:
    parent = version.get("parent")
    if not parent:
        return "-"
    return f"{parent.get('relation') or 'from'} {parent['model']}@{parent['version']}"


def _versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table("version", "status", "lineage", "artifacts", "metrics", "notes", "created", title="versions")
    for v in versions:
        table.add_row(
            v["version"],
            v["status"],
            _lineage(v),
            str(len(v["artifacts"])),
            metrics_text(v["eval_metrics"]),
            v["notes"] or "-",
            ago(v["created_at"]),
        )
    return table


@device_app.command("create")
def device_create(
    name: str,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value, repeatable.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Register a device (admin token) and print its one-time enrollment token."""
    labels = parse_labels(label or [])
    with api(server, token) as client:
        # A retry after a lost answer replays it, without the token (the server keeps no secret): mint a new one.
        device = client.post("/v1/devices", {"name": name, "labels": labels}, idempotency_key=new_idempotency_key())
        if device.get("enrollment_token") is None:
            device = client.post(f"/v1/devices/{device['id']}/enrollment-token")
        server_url = client.config.server
    if output is Output.json:
        emit_json(device)
        return
    console.print(f"created device [bold]{device['name']}[/bold] (id {device['id']}), labels {labels_text(labels)}")
    _print_enrollment(device, server_url)


def _print_enrollment(device: dict[str, Any], server_url: str) -> None:
    console.print(f"enrollment token (shown once, expires {device['enrollment_expires_at']}):")
    console.print(device["enrollment_token"], soft_wrap=True, highlight=False)
    console.print(
        "on the device: SLMOPS_AGENT_CONTROL_PLANE_URL="
        f"{server_url} SLMOPS_AGENT_ENROLLMENT_TOKEN=<token> slmops agent",
        soft_wrap=True,
        highlight=False,
    )


@device_app.command("reissue-token")
def device_reissue_token(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new one-time enrollment token for a device (admin); its current credential stops working."""
    with api(server, token) as client:
        device = client.post(f"/v1/devices/{device_id}/enrollment-token")
    if output is Output.json:
        emit_json(device)
        return
    _print_enrollment(device, client.config.server)


@device_app.command("list")
def device_list(
    selector: Annotated[str | None, typer.Option(help="Label selector, e.g. region=eu,tier!=canary")] = None,
    status: Annotated[str | None, typer.Option(help="online, offline, pending_enrollment, decommissioned")] = None,
    limit: Annotated[int, typer.Option(help="List at most this many (0: all).", min=0)] = 200,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List devices, filtered by labels and status."""
    with api(server, token) as client:
        devices, more = client.get_items("/v1/devices", limit or None, selector=selector, status=status)
    if output is Output.json:
        emit_json(devices)
        return
    title = f"{len(devices)} devices" + (" (more left: --limit 0 lists all)" if more else "")
    table = Table("id", "name", "status", "labels", "running", "last seen", title=title)
    for d in devices:
        table.add_row(d["id"], d["name"], d["status"], labels_text(d["labels"]), _running(d), ago(d["last_seen"]))
    console.print(table)


def _running(device: dict[str, Any]) -> str:
    if not device.get("current_version"):
        return "-"
    return f"{device.get('current_model') or '?'}@{device['current_version']}"


@device_app.command("show")
def device_show(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show one device: status, labels, hardware, what it runs."""
    with api(server, token) as client:
        device = client.get(f"/v1/devices/{device_id}")
    if output is Output.json:
        emit_json(device)
        return
    table = Table.grid(padding=(0, 2))
    rows = {
        "id": device["id"],
        "name": device["name"],
        "status": device["status"],
        "labels": labels_text(device["labels"]),
        "running": _running(device),
        "sha256": device.get("current_sha256") or "-",
        "last seen": ago(device["last_seen"]),
        "enrolled": ago(device["enrolled_at"]),
    }
    rows |= {f"hw.{k}": str(v) for k, v in sorted((device.get("hardware") or {}).items())}
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


@app.command("login")
def login(
    server: Annotated[str, typer.Option(prompt="Control plane URL", help="e.g. http://cp.example:8080")],
    token: Annotated[str, typer.Option(prompt="API token", hide_input=True, help="From `slmops token create`.")],
) -> None:
    """Check a server URL and token, then keep them in the CLI config file (readable by you only)."""
    with api(server, token) as client:
        client.get("/v1/models", limit=1)  # proves both the URL and the token
        server_url = client.config.server
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:  # JSON strings are valid TOML basic strings
        fh.write(f"server = {json.dumps(server_url)}\ntoken = {json.dumps(token)}\n")
    os.replace(temp, path)
    console.print(f"logged in to {server_url}; saved to {path}")
