"""`slmops server`, `slmops db ...` and `slmops token create` (local bootstrap, straight to the database)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slmops.cli.app import app, db_app, token_app

console = Console()
err = Console(stderr=True)


def _settings():  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from control_plane.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        err.print("[red]Invalid configuration:[/red]")
        for error in exc.errors():
            field = "SLMOPS_" + "_".join(str(p) for p in error["loc"]).upper() if error["loc"] else "settings"
            err.print(f"  {field}: {error['msg']}")
        raise typer.Exit(2) from None


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Listen address (default SLMOPS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default SLMOPS_PORT).")] = None,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not upgrade the schema at start.")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve https (SLMOPS_TLS_CERT_FILE).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert (SLMOPS_TLS_KEY_FILE).")] = None,
) -> None:
    """Run the control plane (SQLite in ./.slmops and defaults when nothing is configured)."""
    import uvicorn

    from control_plane import db
    from control_plane.api.main import create_app
    from slmops.heap import settle_heap

    settings = _settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    _apply_tls(settings, tls_cert, tls_key)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not no_migrate:
        db.upgrade(settings.sqlalchemy_url)
    scheme = "https" if settings.tls_enabled else "http"
    console.print(f"slmops control plane on {scheme}://{settings.host}:{settings.port}  (API docs: /docs)")
    from shared.logs import configure  # the same plain or JSON-lines format as the agent

    configure(json_lines=settings.log_json, level=settings.log_level)
    application = create_app(settings)
    settle_heap()
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level="info",
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


def _apply_tls(settings, cert: Path | None, key: Path | None) -> None:  # type: ignore[no-untyped-def]
    if cert is None and key is None:
        return
    if cert is None or key is None:
        err.print("[red]--tls-cert and --tls-key go together[/red]")
        raise typer.Exit(2)
    for path in (cert, key):
        if not path.is_file():
            err.print(f"[red]TLS file not found:[/red] {path}")
            raise typer.Exit(2)
    settings.tls_cert_file, settings.tls_key_file = cert, key


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default head)."""
    from control_plane import db

    settings = _settings()
    db.upgrade(settings.sqlalchemy_url, revision)
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    from control_plane import db

    db.downgrade(_settings().sqlalchemy_url, revision)
    console.print(f"database at {revision}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision and whether it is at head."""
    from control_plane import db

    engine = db.make_engine(_settings().sqlalchemy_url)
    current, head = db.current_revision(engine), db.head_revision()
    console.print(f"current: {current}  head: {head}  {'(up to date)' if current == head else '(behind)'}")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "admin",
    name: Annotated[str, typer.Option(help="A label for the token")] = "bootstrap",
) -> None:
    """Create an API token directly in the database (bootstrap); prints it once."""
    from sqlmodel import Session

    from control_plane import db
    from control_plane.models import Role
    from control_plane.services import audit, auth

    if role not in Role.__members__:
        err.print(f"[red]unknown role {role!r}[/red]: use viewer, operator or admin")
        raise typer.Exit(2)
    settings = _settings()
    db.upgrade(settings.sqlalchemy_url)
    engine = db.make_engine(settings.sqlalchemy_url)
    with Session(engine, expire_on_commit=False) as session:
        token, plaintext = auth.create_token(session, name=name, role=Role[role], created_by="cli")
        audit.record(session, actor="cli:local", action="token.create", target=token.id, request_id="", role=role)
        session.commit()
    err.print(f"created {role} token {name!r} (id {token.id}); it is shown only once:")
    sys.stdout.write(plaintext + "\n")
