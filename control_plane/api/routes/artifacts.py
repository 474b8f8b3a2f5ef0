"""`/v1/artifacts/{sha256}`: content-addressed download with Range, ETag and If-None-Match."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from control_plane.api.deps import BlobStoreDep, PrincipalDep, SessionDep, SettingsDep
from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Role
from control_plane.services import artifact_access, registry
from control_plane.services.auth import require_role

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get(
    "/{sha256}",
    response_class=FileResponse,
    responses={
        206: {"description": "Partial content"},
        304: {"description": "Not modified"},
        307: {"description": "Fetch the bytes from the reference, or a presigned URL of the shared store"},
    },
)
def download_artifact(
    sha256: str,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    store: BlobStoreDep,
    settings: SettingsDep,
) -> Any:
    """Stream an artifact. Viewers may download any; a device only those of versions assigned to it."""
    sha256 = sha256.lower()
    if principal.kind != "device":
        require_role(principal, Role.viewer)
    elif not artifact_access.device_may_fetch(session, principal.id, sha256):
        # The same answer as for an unknown sha256: a device learns nothing about other artifacts.
        raise DomainError(ErrorCode.ARTIFACT_NOT_FOUND, f"no artifact with sha256 {sha256}")
    artifact = registry.find_artifact(session, sha256)
    etag = f'"{artifact.sha256}"'
    if artifact.external_url and not store.exists(artifact.sha256):
        # A reference registered before the rules (or under an allow-list since shortened) is checked again.
        registry.check_reference(artifact.external_url, settings.artifact_reference_allowed_hosts)
        return RedirectResponse(artifact.external_url, status_code=307, headers={"ETag": etag})
    if not store.exists(artifact.sha256):
        raise DomainError(ErrorCode.ARTIFACT_NOT_FOUND, "the artifact's bytes are missing from the blob store")
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    if (url := store.download_url(artifact.sha256)) is not None:
        # A shared store serves the bytes (Range included): the replica only signs a short-lived URL.
        return RedirectResponse(url, status_code=307, headers={"ETag": etag, "Cache-Control": "no-store"})
    return FileResponse(
        store.path_for(artifact.sha256),
        media_type="application/octet-stream",
        filename=f"{artifact.sha256}.{artifact.format}",
        headers={"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"},
    )
