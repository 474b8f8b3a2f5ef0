"""`slmops agent`: run the edge agent daemon, and talk to a running one (apply, rollback, status).

`apply`, `rollback` and `status` reach the daemon over its loopback API with the admin token from
its data dir; `apply` falls back to writing the watched desired-state file when it is not running.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from slmops.cli.app import agent_app

DEFAULT_CONFIG = Path("/etc/slmops/agent.toml")
CONFIG_HELP = "Agent TOML config (default: $SLMOPS_AGENT_CONFIG or /etc/slmops/agent.toml if present)."


def _config_path(explicit: Path | None, ctx: typer.Context) -> Path | None:
    if explicit is not None:
        return explicit
    if ctx.obj and ctx.obj.get("config"):
        return ctx.obj["config"]
    if env := os.environ.get("SLMOPS_AGENT_CONFIG"):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _settings(config: Path | None, **overrides: Any) -> Any:
    from edge_agent.settings import ConfigError, load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@agent_app.callback(invoke_without_command=True)
def agent(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    log_json: bool = typer.Option(False, "--log-json", help="Log one JSON object per line."),
) -> None:
    """Run the edge agent daemon (when no subcommand is given)."""
    ctx.obj = {"config": config}
    if ctx.invoked_subcommand is not None:
        return
    from edge_agent.daemon import run
    from edge_agent.errors import AgentError

    settings = _settings(_config_path(config, ctx), **({"log_json": True} if log_json else {}))
    try:
        code = run(settings)
    except AgentError as exc:
        typer.echo(f"error ({exc.code}): {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


def _admin_call(settings: Any, method: str, path: str, **kwargs: Any) -> Any | None:
    """Call the running agent's admin API; None when no agent answers."""
    import httpx

    try:
        token = settings.admin_token_path.read_text().strip()
    except OSError:
        return None
    try:
        response = httpx.request(
            method,
            settings.base_url + path,
            headers={"Authorization": f"Bearer {token}"},
            timeout=660,
            **kwargs,
        )
    except httpx.ConnectError:
        return None
    body = response.json()
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        typer.echo(f"error ({error.get('code')}): {error.get('message')}", err=True)
        raise typer.Exit(1)
    return body


def _print_state(state: dict[str, Any]) -> None:
    def ref(r: dict[str, Any] | None) -> str:
        return f"{r['model']} {r['version']} ({r['sha256'][:12]})" if r else "-"

    typer.echo(f"phase:    {state['phase']}" + (f" ({state['reason']})" if state.get("reason") else ""))
    typer.echo(f"current:  {ref(state.get('current'))}")
    typer.echo(f"previous: {ref(state.get('previous'))}")
    if state.get("pending"):
        typer.echo(f"pending:  {ref(state['pending'])}")
    typer.echo(f"serving:  {state.get('serving')}")


@agent_app.command("apply")
def apply(
    ctx: typer.Context,
    desired: Path = typer.Option(..., "--desired", exists=True, dir_okay=False, help="Desired-state JSON."),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the agent has acted on it."),
) -> None:
    """Make the agent reconcile towards a desired state (model, version, artifact, runtime)."""
    from edge_agent.fsutil import write_atomic
    from edge_agent.sources import read_desired

    settings = _settings(_config_path(config, ctx))
    try:
        state = read_desired(desired)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    body = _admin_call(settings, "POST", "/v1/admin/desired", params={"wait": wait}, json=state.model_dump(mode="json"))
    if body is None:
        write_atomic(settings.desired_path, state.model_dump_json(indent=2).encode())
        typer.echo(f"agent not running; wrote {settings.desired_path}, applied when it starts")
        return
    _print_state(body)
    if wait and body["phase"] in ("download_failed", "activation_failed"):
        raise typer.Exit(1)


@agent_app.command("rollback")
def rollback(ctx: typer.Context, config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP)) -> None:
    """Return to the previous verified model now."""
    settings = _settings(_config_path(config, ctx))
    body = _admin_call(settings, "POST", "/v1/admin/rollback")
    if body is None:
        typer.echo(f"error: no agent answers at {settings.base_url}", err=True)
        raise typer.Exit(1)
    _print_state(body)


@agent_app.command("status")
def status(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full status as JSON."),
) -> None:
    """Show the agent's state (from the running agent, else from its state file)."""
    settings = _settings(_config_path(config, ctx))
    body = _admin_call(settings, "GET", "/v1/admin/state")
    if body is None:
        from edge_agent.statefile import StateFile

        state = StateFile(settings.state_path).load().to_wire(device_id=None, serving=False)
        body = {"state": state.model_dump(mode="json"), "ready": False, "running": False}
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    _print_state(body["state"])
    download = body.get("download")
    if download and body["state"]["phase"] == "downloading":
        done, total = download["bytes_done"], download["bytes_total"]
        rate = download["rate_bps"] / 1e6
        typer.echo(f"download: {done}/{total} bytes ({100 * done / max(total, 1):.0f}%), {rate:.1f} MB/s")
