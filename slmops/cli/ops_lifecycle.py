"""After the first rollout: relabel devices, deprecate, recall and delete versions, collect garbage."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli.app import device_app, model_app
from slmops.cli.ops_common import (
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    api,
    console,
    emit_json,
    human_bytes,
    labels_text,
    parse_labels,
    usage_error,
)

LabelOpt = Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value, repeatable.")]


@device_app.command("update")
def device_update(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help="A new name.")] = None,
    label: LabelOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Rename a device or replace its labels (every --label given is its whole new set)."""
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if label is not None:
        body["labels"] = parse_labels(label)
    if not body:
        usage_error("validation_error", "give --name or at least one --label")
    with api(server, token) as client:
        device = client.patch(f"/v1/devices/{device_id}", body)
    if output is Output.json:
        emit_json(device)
        return
    console.print(f"device [bold]{device['name']}[/bold] ({device['id']}): labels {labels_text(device['labels'])}")


@device_app.command("relabel")
def device_relabel(
    selector: Annotated[str, typer.Option(help="Which devices, e.g. region=eu,tier=main (required).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value to set, repeatable.")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Label key to remove, repeatable.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Set and remove labels on every device a selector matches."""
    body = {"selector": selector, "set": parse_labels(set_ or []), "remove": remove or []}
    with api(server, token) as client:
        result = client.post("/v1/devices/relabel", body)
    if output is Output.json:
        emit_json(result)
        return
    console.print(f"{result['matched']} device(s) matched {selector!r}")


@device_app.command("decommission")
def device_decommission(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Retire a device (admin): its credential stops now, on HTTP and on the broker."""
    if not yes:
        typer.confirm(f"decommission {device_id}? Only a new enrollment token brings it back", abort=True)
    with api(server, token) as client:
        device = client.post(f"/v1/devices/{device_id}/decommission")
    console.print(f"device [bold]{device['name']}[/bold] ({device['id']}) is decommissioned")


@device_app.command("rotate-credential")
def device_rotate_credential(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    grace_s: Annotated[int, typer.Option(help="How long the old secret keeps working.", min=0)] = 3600,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Have the device's agent fetch a new secret (admin); the old one works GRACE_S longer."""
    with api(server, token) as client:
        device = client.post(f"/v1/devices/{device_id}/rotate-credential", {"grace_s": grace_s})
    console.print(f"device [bold]{device['name']}[/bold]: its agent fetches a new secret at its next check")


def _set_status(model: str, version: str, status: str, server: str | None, token: str | None) -> dict[str, Any]:
    with api(server, token) as client:
        response = client.request("PATCH", f"/v1/models/{model}/versions/{version}", json={"status": status})
    body: dict[str, Any] = response.json()
    body["rollout"] = response.headers.get("location")
    return body


@model_app.command("deprecate")
def model_deprecate(
    model: str, version: str, server: ServerOpt = None, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """No new rollout may target this version; devices running it keep it."""
    body = _set_status(model, version, "deprecated", server, token)
    if output is Output.json:
        emit_json(body)
        return
    console.print(f"{model}@{version} is deprecated")


@model_app.command("recall")
def model_recall(
    model: str, version: str, server: ServerOpt = None, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """Recall a version: the control plane rolls every device off it to the newest good version."""
    body = _set_status(model, version, "recalled", server, token)
    if output is Output.json:
        emit_json(body)
        return
    where = f"; watch it with: slmops rollout show {body['rollout'].rsplit('/', 1)[1]}" if body["rollout"] else ""
    console.print(f"{model}@{version} is recalled{where}")


@model_app.command("delete")
def model_delete(model: str, version: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete a version no device runs or is meant to run, and the blobs nothing else references."""
    with api(server, token) as client:
        client.delete(f"/v1/models/{model}/versions/{version}")
    console.print(f"{model}@{version} deleted")


@model_app.command("retention")
def model_retention(
    model: str,
    keep: Annotated[int, typer.Option(help="Keep the newest N versions (0: keep every version).", min=0)],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Set how many versions `slmops model gc` keeps (a version a device runs is always kept)."""
    with api(server, token) as client:
        client.patch(f"/v1/models/{model}", {"keep_versions": keep or None})
    console.print(f"{model}: keeps " + (f"its newest {keep} versions" if keep else "every version"))


@model_app.command("gc")
def model_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Apply every model's retention policy, then remove the blobs no version references (admin)."""
    with api(server, token) as client:
        result = client.request("POST", "/v1/models/gc", params={"dry_run": dry_run}).json()
    if output is Output.json:
        emit_json(result)
        return
    table = Table("blob sha256", "size", title="would be removed" if dry_run else "removed")
    for blob in result["blobs"]:
        table.add_row(blob["sha256"], human_bytes(blob["size_bytes"]))
    console.print(table)
    versions = ", ".join(result["versions"]) or "none"
    verb = "would free" if dry_run else "freed"
    console.print(f"versions past retention: {versions}; {verb} {human_bytes(result['bytes_freed'])}")
