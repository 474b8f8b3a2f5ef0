"""The OpenAPI document: every error a route can answer, as RFC 9457 problem+json, and every schema it names.

FastAPI documents only the success and a 422 in its own shape; the routes answer problem+json for
every error, so each operation lists the statuses it can give and a `default` for the rest.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from control_plane.api.auth_first import iter_api_routes, needs_principal
from control_plane.schemas import ArtifactReference, VersionByReference

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `code` is stable, other members depend on it.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "instance": {"type": "string"},
    },
    "additionalProperties": True,
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an operator API token (slm_...)"},
    "deviceBasic": {"type": "http", "scheme": "basic", "description": "a device: its id and secret"},
}
# Routes without a principal whose refused credentials count against the caller's address.
RATE_LIMITED_PUBLIC = frozenset({"/v1/devices/enroll"})
# Schemas that routes name in `openapi_extra` (bodies parsed by hand) rather than in a signature.
EXTRA_MODELS = (VersionByReference, ArtifactReference)
_DESCRIPTIONS = {
    "401": "No credential, or an unknown or revoked one",
    "403": "The credential's role is not enough",
    "413": "The request body is larger than this route accepts",
    "422": "The request is not valid",
    "429": "Too many failed attempts from this address (see Retry-After)",
    "default": "Any other error",
}


def _problem(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/problem+json": {"schema": PROBLEM_REF}},
    }
    if status == "429":
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


def _error_statuses(route: APIRoute, operation: dict[str, Any]) -> list[str]:
    statuses = ["422", "default"]
    if needs_principal(route.dependant):
        statuses += ["401", "403", "429"]
    elif route.path in RATE_LIMITED_PUBLIC:
        statuses += ["401", "429"]
    if "requestBody" in operation:
        statuses.append("413")
    return statuses


def _document_errors(app: FastAPI, schema: dict[str, Any]) -> None:
    for route in iter_api_routes(app.routes):
        if not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            if needs_principal(route.dependant):
                operation["security"] = [{"bearer": []}, {"deviceBasic": []}]
            responses = operation.setdefault("responses", {})
            for status in _error_statuses(route, operation):
                responses[status] = _problem(status)


def _add_components(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, extra = models_json_schema(
        [(model, "validation") for model in EXTRA_MODELS], ref_template="#/components/schemas/{model}"
    )
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    components["Problem"] = PROBLEM_SCHEMA
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _document_errors(app, schema)
            _add_components(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
