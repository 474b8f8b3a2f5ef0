"""Operator commands over the control plane's REST API: `slmops model ...`, `slmops device ...`.

The rollout commands live in `ops_rollout` and register when this module is imported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from slmops.cli import ops_rollout  # noqa: F401  (registers `slmops rollout ...`)
from slmops.cli.app import device_app, model_app
from slmops.cli.client import ApiClient, ApiError, MultipartFile, file_sha256, push_idempotency_key
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
    human_bytes,
    labels_text,
    parse_json_object,
    parse_labels,
)

PUSH_ATTEMPTS = 3


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
        model = client.post("/v1/models", {"name": name, "description": description, "task": task})
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
    console.print(_artifacts_table(versions))


def _lineage(version: dict[str, Any]) -> str:
    parent = version.get("parent")
    if not parent:
        return "-"
    return f"{parent.get('relation') or 'from'} {parent['model']}@{parent['version']}"


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(metrics.items())) or "-"


def _versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table("version", "status", "lineage", "artifacts", "metrics", "notes", "created", title="versions")
    for v in versions:
        table.add_row(
            v["version"],
            v["status"],
            _lineage(v),
            str(len(v["artifacts"])),
            _metrics(v["eval_metrics"]),
            v["notes"] or "-",
            ago(v["created_at"]),
        )
    return table


def _artifacts_table(versions: list[dict[str, Any]]) -> Table:
    table = Table("version", "format", "quant", "size", "sha256", "needs", "metrics", title="artifacts")
    for v in versions:
        for a in v["artifacts"]:
            needs = [f"{a['min_ram_mb']} MB RAM"] if a["min_ram_mb"] else []
            needs += a["accelerators"] + a["cpu_arch"]
            table.add_row(
                v["version"],
                a["format"],
                a["quantization"] or "-",
                human_bytes(a["size_bytes"]),
                a["sha256"][:16],
                ", ".join(needs) or "any",
                _metrics(a["eval_metrics"]),
            )
    return table


@model_app.command("push")
def model_push(
    name: str,
    version: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    quantization: Annotated[str | None, typer.Option(help="e.g. Q8_0, F16 (default: read from the file)")] = None,
    parent: Annotated[str | None, typer.Option(help="Parent version, or model@version.")] = None,
    relation: Annotated[
        str | None, typer.Option(help="quantized_from, distilled_from, finetuned_from or adapter_of")
    ] = None,
    notes: Annotated[str | None, typer.Option(help="Free text shown with the version.")] = None,
    metrics: Annotated[str | None, typer.Option(help='Evaluation metrics, a JSON object: {"ppl": 7.1}')] = None,
    min_ram_mb: Annotated[int | None, typer.Option(help="Least device RAM this artifact needs.")] = None,
    cpu_arch: Annotated[str | None, typer.Option(help="Comma separated, e.g. x86_64,aarch64")] = None,
    accelerators: Annotated[str | None, typer.Option(help="Comma separated, e.g. cuda,npu")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Upload FILE as VERSION of model NAME: streamed, sha256-verified, safe to run again."""
    parse_json_object("--metrics", metrics)
    fields = {
        "version": version,
        "quantization": quantization,
        "parent": parent,
        "relation": relation,
        "notes": notes,
        "eval_metrics": metrics,
        "min_ram_mb": None if min_ram_mb is None else str(min_ram_mb),
        "cpu_arch": cpu_arch,
        "accelerators": accelerators,
    }
    with api(server, token) as client:
        sha256 = _hash_with_progress(file)
        result = _already_pushed(client, name, version, sha256)
        replayed = result is not None
        if result is None:
            body = MultipartFile(file, {"sha256": sha256} | {k: v for k, v in fields.items() if v is not None})
            result, replayed = _upload(client, name, version, sha256, body)
    if output is Output.json:
        emit_json(result)
        return
    if replayed:
        console.print(f"[bold]{name}@{version}[/bold] already holds this file (sha256 {sha256}); nothing duplicated")
    else:
        console.print(f"pushed [bold]{name}@{version}[/bold]: sha256 {sha256} verified by the server")
    console.print(_artifacts_table([result]))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _hash_with_progress(file: Path) -> str:
    with _progress() as progress:
        task = progress.add_task("sha256", total=file.stat().st_size)
        return file_sha256(file, lambda n: progress.advance(task, n))


def _already_pushed(client: ApiClient, name: str, version: str, sha256: str) -> dict[str, Any] | None:
    """The version when an earlier run already stored these bytes; refuses other bytes before uploading."""
    try:
        existing: dict[str, Any] = client.get(f"/v1/models/{name}/versions/{version}")
    except ApiError as exc:
        if exc.code == "version_not_found":
            return None
        raise
    if any(a["sha256"] == sha256 for a in existing["artifacts"]):
        return existing
    raise ApiError("version_exists", f"{name}@{version} already exists with other bytes", status=409)


def _upload(
    client: ApiClient, name: str, version: str, sha256: str, body: MultipartFile
) -> tuple[dict[str, Any], bool]:
    """POST the body, retrying a broken connection with the same Idempotency-Key (replayed, not duplicated)."""
    key = push_idempotency_key(name, version, sha256)
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            return _upload_once(client, f"/v1/models/{name}/versions", body, key)
        except ApiError as exc:
            if exc.code == "version_exists" and (done := _already_pushed(client, name, version, sha256)):
                return done, True  # a concurrent or earlier push of the same bytes won the race
            if exc.code != "connection_failed" or attempt == PUSH_ATTEMPTS:
                raise
            err.print(f"[yellow]upload interrupted ({exc.detail}); retrying ({attempt}/{PUSH_ATTEMPTS - 1})[/yellow]")
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _upload_once(client: ApiClient, path: str, body: MultipartFile, key: str) -> tuple[dict[str, Any], bool]:
    with _progress() as progress:
        task = progress.add_task(f"upload {body.path.name}", total=body.path.stat().st_size)
        response = client.upload(path, body, idempotency_key=key, on_bytes=lambda n: progress.advance(task, n))
    return response.json(), response.headers.get("idempotent-replayed") == "true"


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
        device = client.post("/v1/devices", {"name": name, "labels": labels})
        server_url = client.config.server
    if output is Output.json:
        emit_json(device)
        return
    console.print(f"created device [bold]{device['name']}[/bold] (id {device['id']}), labels {labels_text(labels)}")
    console.print(f"enrollment token (shown once, expires {device['enrollment_expires_at']}):")
    console.print(device["enrollment_token"], soft_wrap=True, highlight=False)
    console.print(
        "on the device: SLMOPS_AGENT_CONTROL_PLANE_URL="
        f"{server_url} SLMOPS_AGENT_ENROLLMENT_TOKEN=<token> slmops agent",
        soft_wrap=True,
        highlight=False,
    )


@device_app.command("list")
def device_list(
    selector: Annotated[str | None, typer.Option(help="Label selector, e.g. region=eu,tier!=canary")] = None,
    status: Annotated[str | None, typer.Option(help="e.g. online, offline, pending")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List devices, filtered by labels and status."""
    with api(server, token) as client:
        devices = client.get_all("/v1/devices", selector=selector, status=status)
    if output is Output.json:
        emit_json(devices)
        return
    table = Table("id", "name", "status", "labels", "running", "last seen", title=f"{len(devices)} devices")
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
