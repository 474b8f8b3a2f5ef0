"""What the operator commands share: connection options, `--output`, error reporting, formatting."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slmops.cli.client import ApiClient, ApiError, resolve_config

console = Console()
err = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    json = "json"


ServerOpt = Annotated[
    str | None,
    typer.Option("--server", help="Control plane URL (else SLMOPS_SERVER, ~/.config/slmops/cli.toml)."),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="API token (else SLMOPS_TOKEN, ~/.config/slmops/cli.toml).")
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts.")]


def fail(exc: ApiError) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(exc.one_line())}")
    if exc.hint:
        err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}")
    raise typer.Exit(1)


def usage_error(code: str, detail: str) -> NoReturn:
    fail(ApiError(code, detail))


@contextmanager
def api(server: str | None, token: str | None) -> Iterator[ApiClient]:
    """An API client; any ApiError inside the block ends the command with its message and hint."""
    try:
        with ApiClient(resolve_config(server, token)) as client:
            yield client
    except ApiError as exc:
        fail(exc)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(size: int | float | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def ago(timestamp: str | None) -> str:
    """'3m ago' from an ISO timestamp; '-' when absent."""
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def labels_text(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            usage_error("validation_error", f"--label {pair!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_json_object(option: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        usage_error("validation_error", f"{option} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        usage_error("validation_error", f"{option} must be a JSON object")
    return value


def metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(metrics.items())) or "-"


def artifacts_table(versions: list[dict[str, Any]]) -> Table:
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
                metrics_text(a["eval_metrics"]),
            )
    return table
