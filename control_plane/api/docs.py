"""`/docs`: Swagger UI from the installed `swagger-ui-py` package and this one, never from a CDN.

The page loads scripts from this server only; its CSP forbids inline and foreign scripts.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

router = APIRouter(include_in_schema=False)
SWAGGER_DIR = Path(swagger_ui.__file__).parent / "static"
OWN_DIR = Path(__file__).parent / "static"
# name -> (folder, media type): a fixed list, so no path from the URL reaches the filesystem.
ASSETS = {
    "swagger-ui-bundle.js": (SWAGGER_DIR, "text/javascript"),
    "swagger-ui.css": (SWAGGER_DIR, "text/css"),
    "favicon-32x32.png": (SWAGGER_DIR, "image/png"),
    "docs-init.js": (OWN_DIR, "text/javascript"),
}
DOCS_HEADERS = {
    # Swagger UI sets style attributes and draws icons from data: URIs; scripts stay 'self' only.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slmops control plane - API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/docs-init.js"></script></body></html>
"""


@router.get("/docs")
def swagger_page() -> Response:
    return HTMLResponse(PAGE, headers=DOCS_HEADERS)


@router.get("/docs/static/{name}")
def swagger_asset(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    folder, media_type = ASSETS[name]
    headers = {"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"}
    return FileResponse(folder / name, media_type=media_type, headers=headers)
