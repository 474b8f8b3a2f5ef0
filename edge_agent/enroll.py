"""First-start enrollment: trade the one-time enrollment token for a device credential, keep it 0600."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from pydantic import BaseModel, ValidationError

from edge_agent import __version__
from edge_agent.errors import EnrollmentError
from edge_agent.fsutil import write_atomic
from shared.enrollment import EnrollRequest, EnrollResponse
from shared.hardware import HardwareProfile
from shared.signing import SignedMetadata

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class Credential(BaseModel):
    device_id: str
    device_secret: str
    mqtt_url: str | None = None
    topic_prefix: str = "slmops/v1"
    control_plane_url: str | None = None
    root_metadata: list[SignedMetadata] | None = None  # the enrollment answer's root chain (edge_agent.trust)


def hardware_profile() -> HardwareProfile:
    return HardwareProfile(
        cpu_model=platform.processor() or platform.machine(),
        cpu_cores=psutil.cpu_count(logical=True) or 0,
        ram_mb=psutil.virtual_memory().total // (1024 * 1024),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        agent_version=__version__,
    )


def load_credential(path: Path) -> Credential | None:
    if not path.exists():
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("credential file %s is readable by others (mode %o); tightening to 0600", path, mode)
        os.chmod(path, 0o600)
    try:
        return Credential.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise EnrollmentError(f"credential file {path} is unreadable: {exc}", code="credential_invalid") from exc


def enroll(
    client: httpx.Client, control_plane_url: str, token: str, path: Path, identity: tuple[Path, Path] | None = None
) -> Credential:
    """POST /v1/devices/enroll and store the credential; RFC 9457 error codes become EnrollmentError.

    With `identity` = (certificate, key) paths it sends a CSR over a key made here and stores the certificate.
    """
    import httpx

    from edge_agent.identity import certificate_request, store_certificate

    csr = certificate_request(identity[1]) if identity else None
    request = EnrollRequest(enrollment_token=token, hardware=hardware_profile(), csr_pem=csr)
    url = control_plane_url.rstrip("/") + "/v1/devices/enroll"
    try:
        response = client.post(url, json=request.model_dump(mode="json"))
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the control plane at {url}: {exc}", code="unreachable") from exc
    if response.status_code != 201:
        code, detail = _problem(response)
        raise EnrollmentError(f"enrollment refused (HTTP {response.status_code}): {detail}", code=code)
    answer = EnrollResponse.model_validate_json(response.content)
    if identity is not None and answer.client_certificate_pem:
        store_certificate(identity[0], answer.client_certificate_pem)
    elif identity is not None:
        log.warning("the control plane issued no device certificate (SLMOPS_DEVICE_CERTIFICATES off?)")
    credential = Credential(
        device_id=answer.device_id,
        device_secret=answer.device_secret,
        mqtt_url=answer.mqtt_url,
        topic_prefix=answer.topic_prefix,
        control_plane_url=control_plane_url,
        root_metadata=answer.root_metadata,
    )
    write_atomic(path, credential.model_dump_json().encode(), mode=0o600)
    log.info("enrolled as device %s", credential.device_id)
    return credential


def _problem(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return f"http_{response.status_code}", response.text[:200]
    if not isinstance(body, dict):
        return f"http_{response.status_code}", str(body)[:200]
    return str(body.get("code") or f"http_{response.status_code}"), str(body.get("detail") or body.get("title"))


def load_or_enroll(
    client: Callable[[], httpx.Client],
    *,
    path: Path,
    control_plane_url: str | None,
    token: str | None,
    identity: tuple[Path, Path] | None = None,
) -> Credential | None:
    """The stored credential, or a new one from enrollment; None for a standalone agent."""
    credential = load_credential(path)
    if credential is not None:
        return credential
    if token is None or control_plane_url is None:
        return None
    return enroll(client(), control_plane_url, token, path, identity)
