"""The `slmops` Typer application and its command groups; commands register themselves on import."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="slmops",
    help="Ship small language models to edge fleets: registry, staged rollouts, edge agent.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema (alembic migrations).", no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens.", no_args_is_help=True)
model_app = typer.Typer(help="Model registry and tiny-model tools.", no_args_is_help=True)
device_app = typer.Typer(help="Devices and enrollment.", no_args_is_help=True)
agent_app = typer.Typer(help="The edge agent daemon and its local tools.", no_args_is_help=False)

app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(model_app, name="model")
app.add_typer(device_app, name="device")
app.add_typer(agent_app, name="agent")
