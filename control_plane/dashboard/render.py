"""Jinja2 environment (autoescaped), display filters, and whole-page or live-block rendering."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from control_plane.models import as_utc, utcnow

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
LIVE_BLOCK = "live"
# Everything the pages load comes from here; inline scripts and styles are refused.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it a browser sends `Origin: null` on the pages' own form posts (Fetch spec).
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def ago(value: datetime | None) -> str:
    stamp = as_utc(value)
    if stamp is None:
        return "never"
    seconds = int((utcnow() - stamp).total_seconds())
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def human_bytes(value: int | None) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}".rstrip("0").rstrip(".")  # 1.5, not 1.500


def utc_time(value: datetime | None) -> str:
    stamp = as_utc(value)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC") if stamp else "–"


def clock(value: datetime | None) -> str:
    stamp = as_utc(value)
    return stamp.strftime("%H:%M:%S") if stamp else "–"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("control_plane.dashboard", "templates"),
        autoescape=True,  # every value is escaped unless a template says otherwise (none does)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, bytes=human_bytes, clock=clock, num=number, utc=utc_time)
    return env


ENV = _environment()


def render(request: Request, name: str, partial: str | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The whole page, or with `partial` only its live block (what the 2-second refresh swaps in)."""
    template = ENV.get_template(name)
    context = {"request": request, "path": request.url.path, "viewer": None, "now": utcnow(), **context}
    if partial and LIVE_BLOCK in template.blocks:
        body = "".join(template.blocks[LIVE_BLOCK](template.new_context(context)))
    else:
        body = template.render(context)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
