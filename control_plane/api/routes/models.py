"""`/v1/models`: models, versions (streamed multipart upload or by reference) and their artifacts."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlmodel import select

from control_plane.api.deps import (
    BlobStoreDep,
    MutationDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    ViewerDep,
)
from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Model, ModelVersion, Role
from control_plane.rollouts import recall
from control_plane.schemas import (
    VERSION_PATTERN,
    ArtifactPublic,
    ArtifactReference,
    ArtifactSpec,
    GcResult,
    ModelCreate,
    ModelPublic,
    ModelUpdate,
    Page,
    VersionByReference,
    VersionPublic,
    VersionSpec,
    VersionStatusUpdate,
)
from control_plane.services import pagination, registry, retention
from control_plane.services.auth import Principal, require_role
from control_plane.services.sniff import sniff_artifact
from control_plane.services.uploads import ReceivedForm, receive_multipart
from shared.references import shown_reference

router = APIRouter(prefix="/v1/models", tags=["models"])

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["version", "file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "version": {"type": "string", "pattern": VERSION_PATTERN},
                        "sha256": {"type": "string", "description": "declared digest, verified"},
                        "quantization": {"type": "string"},
                        "notes": {"type": "string"},
                        "parent": {"type": "string", "description": "version or model@version"},
                        "relation": {"type": "string"},
                        "eval_metrics": {"type": "string", "description": "JSON object"},
                        "provenance": {"type": "string", "description": "JSON object"},
                        "min_ram_mb": {"type": "integer"},
                        "accelerators": {"type": "string", "description": "comma separated"},
                        "cpu_arch": {"type": "string", "description": "comma separated"},
                        "runtime_hints": {"type": "string", "description": "JSON object"},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/VersionByReference"}},
        },
    }
}
# Another variant of a version: its form has no `version` field, its JSON body is a reference.
_ARTIFACT_BODY = copy.deepcopy(_UPLOAD_BODY)
_ARTIFACT_FORM = _ARTIFACT_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
_ARTIFACT_FORM["required"] = ["file"]
del _ARTIFACT_FORM["properties"]["version"]
_ARTIFACT_BODY["requestBody"]["content"]["application/json"] = {
    "schema": {"$ref": "#/components/schemas/ArtifactReference"}
}


@router.post("", status_code=201, response_model=ModelPublic)
def create_model(spec: ModelCreate, principal: OperatorDep, mutation: MutationDep) -> Any:
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    model = registry.create_model(mutation.session, spec=spec, created_by=principal.actor)
    mutation.audit(principal, "model.create", model.name)
    body = ModelPublic.model_validate(model)
    mutation.commit(principal, 201, body)
    return body


@router.get("", response_model=Page[ModelPublic])
def list_models(
    session: SessionDep, _: ViewerDep, cursor: str | None = None, limit: int = Query(50, ge=1, le=500)
) -> Any:
    stmt = pagination.apply_page(select(Model), Model.created_at, Model.id, cursor, limit)
    rows, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    return Page[ModelPublic](data=[ModelPublic.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{name}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep, _: ViewerDep) -> Any:
    return ModelPublic.model_validate(registry.get_model(session, name))


@router.get("/{name}/versions", response_model=Page[VersionPublic])
def list_versions(
    name: str,
    session: SessionDep,
    _: ViewerDep,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    model = registry.get_model(session, name)
    stmt = select(ModelVersion).where(ModelVersion.model_id == model.id)
    stmt = pagination.apply_page(stmt, ModelVersion.created_at, ModelVersion.id, cursor, limit)
    rows, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    data = [registry.version_public(session, model, r) for r in rows]
    return Page[VersionPublic](data=data, next_cursor=next_cursor)


@router.get("/{name}/versions/{version}", response_model=VersionPublic)
def get_version(name: str, version: str, session: SessionDep, _: ViewerDep) -> Any:
    model, row = registry.get_version(session, name, version)
    return registry.version_public(session, model, row)


@router.patch("/{name}", response_model=ModelPublic)
def update_model(name: str, update: ModelUpdate, principal: OperatorDep, mutation: MutationDep) -> Any:
    """Change a model's description or retention policy (`keep_versions`)."""
    model = registry.get_model(mutation.session, name)
    for key, value in update.model_dump(exclude_unset=True).items():
        if key != "description" or value is not None:
            setattr(model, key, value)
    mutation.session.add(model)
    mutation.audit(principal, "model.update", name, **update.model_dump(exclude_unset=True))
    body = ModelPublic.model_validate(model)
    mutation.commit(principal, 200, body)
    return body


@router.post("/gc", response_model=GcResult)
def collect_garbage(
    principal: OperatorDep, mutation: MutationDep, store: BlobStoreDep, dry_run: bool = Query(False)
) -> Any:
    """Apply every model's retention policy, then remove the blobs no artifact references (admin;
    an operator may ask what a collection would remove)."""
    if not dry_run:
        require_role(principal, Role.admin)
    session, grace_s = mutation.session, mutation.settings.blob_gc_grace_s
    plan = retention.plan_gc(session, store, grace_s=grace_s)
    names = [f"{model.name}@{row.version}" for model, row in plan.versions]
    blobs = [{"sha256": sha, "size_bytes": size} for sha, size in plan.blobs]
    if dry_run:
        return GcResult(dry_run=True, versions=names, blobs=blobs, bytes_freed=plan.bytes_freed)
    for model, row in plan.versions:
        retention.delete_version(session, model, row)
    mutation.audit(principal, "model.gc", "blobs", versions=names, blobs=len(blobs), bytes_freed=plan.bytes_freed)
    session.commit()
    freed = retention.remove_unreferenced(session, store, [sha for sha, _ in plan.blobs], grace_s=grace_s)
    return GcResult(dry_run=False, versions=names, blobs=blobs, bytes_freed=freed)


@router.patch("/{name}/versions/{version}", response_model=VersionPublic)
def update_version_status(
    name: str,
    version: str,
    update: VersionStatusUpdate,
    request: Request,
    principal: OperatorDep,
    mutation: MutationDep,
) -> Any:
    """Change a version's status; `recalled` starts the rollout that moves every device off it."""
    session = mutation.session
    model, row = registry.get_version(session, name, version)
    result = recall.change_status(session, model=model, version=row, status=update.status, actor=principal.actor)
    if result is None:
        mutation.audit(principal, "version.status", f"{name}@{version}", status=update.status)
    else:
        audit_recall(mutation, principal, model, row, result)
    body = registry.version_public(session, model, row)
    fleet = getattr(request.app.state, "fleet", None)
    with fleet.handing_over(result.states) if fleet is not None and result else contextlib.nullcontext():
        mutation.commit(principal, 200, body)
    if fleet is not None and result is not None:
        fleet.wake(tick=True)
    rollout_id = result.rollout.id if result and result.rollout else None
    headers = {"Location": f"/v1/rollouts/{rollout_id}"} if rollout_id else {}
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def audit_recall(mutation: Any, principal: Principal, model: Model, row: ModelVersion, result: Any) -> None:
    mutation.audit(
        principal,
        "version.recall",
        f"{model.name}@{row.version}",
        status="recalled",
        to_version=result.to_version,
        rollout_id=result.rollout.id if result.rollout else None,
        devices=result.devices,
        rolled_back=result.rolled_back,
        left_to_other_rollouts=result.left_to,
    )


@router.delete("/{name}/versions/{version}", status_code=204)
def delete_version(
    name: str, version: str, principal: OperatorDep, mutation: MutationDep, store: BlobStoreDep
) -> Response:
    """Delete a version no device runs or is meant to run (409 `version_in_use` names them) and
    the blobs nothing else references."""
    session = mutation.session
    model, row = registry.get_version(session, name, version)
    blobs = retention.delete_version(session, model, row)
    mutation.audit(principal, "version.delete", f"{name}@{version}", blobs=blobs)
    session.commit()
    retention.remove_unreferenced(session, store, blobs, grace_s=mutation.settings.blob_gc_grace_s)
    return Response(status_code=204)


@router.post("/{name}/versions", status_code=201, response_model=VersionPublic, openapi_extra=_UPLOAD_BODY)
async def create_version(
    name: str,
    request: Request,
    principal: OperatorDep,
    mutation: MutationDep,
    store: BlobStoreDep,
    settings: SettingsDep,
) -> Any:
    """Upload a version's first artifact (multipart, streamed) or register it by reference (JSON)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        spec = _parse(VersionByReference, await _json_body(request))
        return await run_in_threadpool(_create_version_by_reference, name, spec, principal, mutation)
    form = await receive_multipart(
        request.headers.get("content-type", ""),
        request.stream(),
        store=store,
        max_bytes=settings.max_upload_bytes,
    )
    return await run_in_threadpool(_create_version_from_upload, name, form, principal, mutation)


@router.post(
    "/{name}/versions/{version}/artifacts",
    status_code=201,
    response_model=ArtifactPublic,
    openapi_extra=_ARTIFACT_BODY,
)
async def add_artifact(
    name: str,
    version: str,
    request: Request,
    principal: OperatorDep,
    mutation: MutationDep,
    store: BlobStoreDep,
    settings: SettingsDep,
) -> Any:
    """Add another variant (other quantization or hardware) to an existing version."""
    if request.headers.get("content-type", "").startswith("application/json"):
        ref = _parse(ArtifactReference, await _json_body(request))
        return await run_in_threadpool(_add_reference, name, version, ref, principal, mutation)
    form = await receive_multipart(
        request.headers.get("content-type", ""),
        request.stream(),
        store=store,
        max_bytes=settings.max_upload_bytes,
    )
    return await run_in_threadpool(_add_uploaded, name, version, form, principal, mutation)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise DomainError(ErrorCode.VALIDATION_ERROR, "the body must be a JSON object in UTF-8") from exc


def _parse(schema: Any, payload: Any) -> Any:
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise DomainError(ErrorCode.VALIDATION_ERROR, "invalid request body", errors=_errors(exc)) from exc


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _form_specs(form: ReceivedForm) -> tuple[VersionSpec, ArtifactSpec]:
    fields = dict(form.fields)
    decoded: dict[str, Any] = {}
    for key in ("eval_metrics", "provenance", "runtime_hints"):
        if fields.get(key):
            try:
                decoded[key] = json.loads(fields[key])
            except json.JSONDecodeError as exc:
                raise DomainError(ErrorCode.VALIDATION_ERROR, f"form field {key!r} must be a JSON object") from exc
    for key in ("accelerators", "cpu_arch"):
        if key in fields:
            decoded[key] = [v.strip() for v in fields[key].split(",") if v.strip()]
    merged = {k: v for k, v in fields.items() if v != ""} | decoded
    return _parse(VersionSpec, merged), _parse(ArtifactSpec, merged)


def _store_upload(form: ReceivedForm, spec: ArtifactSpec) -> tuple[Any, str, dict[str, Any]]:
    """Verify and sniff the received file, then move it into the blob store. Nothing kept on error."""
    writer = form.writer
    if writer is None:
        raise DomainError(ErrorCode.VALIDATION_ERROR, "the multipart body has no 'file' part")
    try:
        writer.verify(spec.sha256)  # before sniffing: a wrong file is a wrong hash first
        fmt, metadata = sniff_artifact(writer.temp_path)
        if spec.format and spec.format != fmt:
            raise DomainError(
                ErrorCode.UNRECOGNIZED_ARTIFACT, f"declared format {spec.format!r} but the file is {fmt}"
            )
    except BaseException:
        writer.abort()
        raise
    return writer.commit(), fmt, metadata


def _create_version_from_upload(name: str, form: ReceivedForm, principal: Principal, mutation: Any) -> Any:
    # The version row is flushed before the blob is adopted, so a refused version keeps no bytes.
    try:
        version_spec, artifact_spec = _form_specs(form)
        fingerprint_body = {"fields": form.fields, "sha256": form.writer.sha256 if form.writer else None}
        if (replayed := mutation.replay(principal, fingerprint_body)) is not None:
            return replayed
        model = registry.get_model(mutation.session, name)
        row = registry.create_version(
            mutation.session, model=model, spec=version_spec, created_by=principal.actor
        )
        blob, fmt, metadata = _store_upload(form, artifact_spec)
    finally:
        if form.writer:
            form.writer.abort()  # no-op once the blob store adopted the file
    registry.add_stored_artifact(
        mutation.session, version=row, blob=blob, fmt=fmt, file_metadata=metadata, spec=artifact_spec
    )
    mutation.audit(principal, "version.create", f"{name}@{row.version}", sha256=blob.sha256)
    body = registry.version_public(mutation.session, model, row)
    mutation.commit(principal, 201, body)
    return JSONResponse(body.model_dump(mode="json"), status_code=201)


def _create_version_by_reference(
    name: str, spec: VersionByReference, principal: Principal, mutation: Any
) -> Any:
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    model = registry.get_model(mutation.session, name)
    row = registry.create_version(mutation.session, model=model, spec=spec, created_by=principal.actor)
    allowed_hosts = mutation.settings.artifact_reference_allowed_hosts
    registry.add_referenced_artifact(mutation.session, version=row, ref=spec.artifact, allowed_hosts=allowed_hosts)
    mutation.audit(principal, "version.create", f"{name}@{row.version}", url=shown_reference(spec.artifact.url))
    body = registry.version_public(mutation.session, model, row)
    mutation.commit(principal, 201, body)
    return JSONResponse(body.model_dump(mode="json"), status_code=201)


def _add_uploaded(name: str, version: str, form: ReceivedForm, principal: Principal, mutation: Any) -> Any:
    try:
        _, artifact_spec = _form_specs(ReceivedForm({**form.fields, "version": version}, form.writer))
        _, row = registry.get_version(mutation.session, name, version)
        blob, fmt, metadata = _store_upload(form, artifact_spec)
    finally:
        if form.writer:
            form.writer.abort()  # no-op once the blob store adopted the file
    artifact = registry.add_stored_artifact(
        mutation.session, version=row, blob=blob, fmt=fmt, file_metadata=metadata, spec=artifact_spec
    )
    mutation.audit(principal, "artifact.create", f"{name}@{version}", sha256=blob.sha256)
    body = registry.artifact_public(artifact, deduplicated=blob.deduplicated)
    mutation.commit(principal, 201, body)
    return JSONResponse(body.model_dump(mode="json"), status_code=201)


def _add_reference(
    name: str, version: str, ref: ArtifactReference, principal: Principal, mutation: Any
) -> Any:
    if (replayed := mutation.replay(principal, ref)) is not None:
        return replayed
    _, row = registry.get_version(mutation.session, name, version)
    artifact = registry.add_referenced_artifact(
        mutation.session, version=row, ref=ref, allowed_hosts=mutation.settings.artifact_reference_allowed_hosts
    )
    mutation.audit(principal, "artifact.create", f"{name}@{version}", url=shown_reference(ref.url))
    body = registry.artifact_public(artifact)
    mutation.commit(principal, 201, body)
    return JSONResponse(body.model_dump(mode="json"), status_code=201)
