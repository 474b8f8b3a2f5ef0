"""The device's X.509 identity: a key made on the device (never leaves it, 0600), a CSR sent at
enrollment, and the certificate the control plane's device CA returns (CN = device id)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.fsutil import write_atomic
from shared.enrollment import CertificateResponse

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


def _device_key(key_path: Path) -> ec.EllipticCurvePrivateKey:
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(key_path, pem, mode=0o600)
    return key


def certificate_request(key_path: Path) -> str:
    """A PEM CSR over the device key (made now if absent); the CA sets the subject itself."""
    key = _device_key(key_path)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slmops-device")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def store_certificate(cert_path: Path, pem: str) -> None:
    x509.load_pem_x509_certificate(pem.encode())  # refuse to store anything but a certificate
    write_atomic(cert_path, pem.encode(), mode=0o644)


def renewal_due(cert_path: Path, now: dt.datetime | None = None) -> bool:
    """True once two thirds of the certificate's lifetime have passed (or it cannot be read)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return (now or dt.datetime.now(dt.UTC)) >= start + (end - start) * 2 / 3


def renew(client: httpx.Client, control_plane_url: str, auth: httpx.Auth, identity: tuple[Path, Path]) -> bool:
    """A new certificate over the same device key; False (logged) when the control plane refused."""
    import httpx

    url = control_plane_url.rstrip("/") + "/v1/devices/me/certificate"
    try:
        response = client.post(url, json={"csr_pem": certificate_request(identity[1])}, auth=auth)
    except httpx.HTTPError as exc:
        log.warning("certificate renewal: cannot reach %s: %s", url, exc)
        return False
    if response.status_code != 201:
        log.warning("certificate renewal refused (HTTP %s): %s", response.status_code, response.text[:200])
        return False
    store_certificate(identity[0], CertificateResponse.model_validate_json(response.content).client_certificate_pem)
    log.info("device certificate renewed")
    return True
