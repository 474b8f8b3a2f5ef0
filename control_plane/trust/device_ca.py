"""The device CA: signs each device's CSR as a client certificate whose CN is its device id, and
keeps the revocation list the broker reads (`crlfile`).

In development it creates itself in `<data dir>/device-ca/`; in production the operator gives it
its certificate and key (`SLMOPS_DEVICE_CA_DIR`), ideally an intermediate of an offline root.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.errors import DomainError, ErrorCode
from shared.topics import is_valid_device_id

MAX_CSR_BYTES = 16 * 1024  # an EC or RSA-4096 CSR is a few KiB
CA_VALIDITY = dt.timedelta(days=10 * 365)
# The broker refuses every certificate once its CRL lapses; only a local file, so no replay risk.
CRL_VALIDITY = dt.timedelta(days=365)
DEFAULT_CERT_VALIDITY = dt.timedelta(days=90)
MAX_LIVE_CERTIFICATES = 2  # the one in use and its renewal


class DeviceCAError(DomainError):
    def __init__(self, detail: str, code: ErrorCode = ErrorCode.CSR_INVALID) -> None:
        super().__init__(code, detail)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DeviceCA:
    """`sign(csr, device_id=...)` issues, `revoke(cert)` rewrites the CRL; files live in `folder`."""

    def __init__(self, folder: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.folder = folder
        self.certificate = certificate
        self._key = key

    @property
    def cert_file(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def crl_file(self) -> Path:
        return self.folder / "ca.crl"

    @classmethod
    def load_or_create(cls, folder: Path, *, name: str = "slmops device CA") -> DeviceCA:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            cert_file, key_file = folder / "ca.crt", folder / "ca.key"
            if not cert_file.exists():
                made = ec.generate_private_key(ec.SECP256R1())
                _write_private(key_file, _key_pem(made), 0o600)
                _write_private(cert_file, _self_signed(made, name).public_bytes(serialization.Encoding.PEM), 0o644)
            loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise DeviceCAError(f"{key_file} is not an EC private key", code=ErrorCode.DEVICE_CA_INVALID)
            ca = cls(folder, x509.load_pem_x509_certificate(cert_file.read_bytes()), loaded)
            ca._refresh_crl()
        return ca

    def sign(self, csr_pem: bytes, *, device_id: str, validity: dt.timedelta = DEFAULT_CERT_VALIDITY) -> bytes:
        """A client certificate for `device_id` over the CSR's key; the CSR's own subject is ignored."""
        csr = _load_csr(csr_pem)
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, csr_pem: bytes, *, device_id: str, validity: dt.timedelta = DEFAULT_CERT_VALIDITY) -> bytes:
        """`sign`, and remember the certificate under the device so `revoke_device` finds it."""
        if not is_valid_device_id(device_id):
            raise DeviceCAError(f"invalid device id {device_id!r}", code=ErrorCode.DEVICE_CA_INVALID)
        cert_pem = self.sign(csr_pem, device_id=device_id, validity=validity)
        serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        folder = self.folder / "issued" / device_id
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(folder / f"{serial:x}.pem", cert_pem, 0o644)
        for path in self._live(device_id)[:-MAX_LIVE_CERTIFICATES]:  # the oldest beyond the cap
            self._revoke_file(path)
        return cert_pem

    def newest(self, device_id: str) -> x509.Certificate | None:
        """The device's most recently issued certificate that is not revoked, if any."""
        live = self._live(device_id)
        return x509.load_pem_x509_certificate(live[-1].read_bytes()) if live else None

    def _live(self, device_id: str) -> list[Path]:
        """The device's unrevoked certificate files, oldest first."""
        folder = self.folder / "issued" / device_id
        if not is_valid_device_id(device_id) or not folder.is_dir():
            return []
        issued = {path: x509.load_pem_x509_certificate(path.read_bytes()) for path in folder.glob("*.pem")}
        return sorted(issued, key=lambda path: (issued[path].not_valid_before_utc, path.stat().st_mtime_ns))

    def _revoke_file(self, path: Path) -> None:
        self.revoke(path.read_bytes())
        path.rename(path.with_suffix(".revoked"))

    def revoke_device(self, device_id: str) -> int:
        """Revoke every certificate issued to `device_id`; how many were still unrevoked."""
        issued = self._live(device_id)
        for path in issued:
            self._revoke_file(path)
        return len(issued)

    def revoke(self, cert_pem: bytes) -> None:
        """Add the certificate to the CRL (atomically rewritten); the broker reads it on SIGHUP."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        with _locked(self.folder):
            current = x509.load_pem_x509_crl(self.crl_file.read_bytes())
            entries = _revoked_entries(current)
            entries.setdefault(cert.serial_number, dt.datetime.now(dt.UTC))
            self._write_crl(entries)

    def _refresh_crl(self) -> None:
        """A new CRL when there is none or less than half its validity is left."""
        current = x509.load_pem_x509_crl(self.crl_file.read_bytes()) if self.crl_file.exists() else None
        if current is not None and current.next_update_utc is not None:
            if current.next_update_utc - dt.datetime.now(dt.UTC) > CRL_VALIDITY / 2:
                return
        self._write_crl(_revoked_entries(current))

    def _write_crl(self, entries: dict[int, dt.datetime], *, validity: dt.timedelta = CRL_VALIDITY) -> None:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + validity)
        )
        for serial, when in sorted(entries.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        _write_private(self.crl_file, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise DeviceCAError(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature) as exc:
        raise DeviceCAError(f"the CSR is not a PEM certificate request: {exc}") from exc
    if not valid:
        raise DeviceCAError("the CSR's signature does not match its key")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise DeviceCAError("the CSR's key must be an EC key (P-256)")
    return csr


def _revoked_entries(crl: x509.CertificateRevocationList | None) -> dict[int, dt.datetime]:
    if crl is None:
        return {}
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time across control-plane replicas sharing the folder."""
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def issue_device_certificate(app: Any, device_id: str, csr_pem: str | None) -> str | None:
    """The enrolling device's certificate when the fleet uses X.509 identities and it sent a CSR."""
    device_ca: DeviceCA | None = getattr(app.state, "device_ca", None)
    if device_ca is None or csr_pem is None:
        return None
    days = app.state.settings.device_certificate_days
    return device_ca.issue(csr_pem.encode(), device_id=device_id, validity=dt.timedelta(days=days)).decode()


def renew_device_certificate(app: Any, device_id: str, csr_pem: str) -> str | None:
    """A new certificate for an enrolled device, once its newest one has spent half its lifetime."""
    device_ca: DeviceCA | None = getattr(app.state, "device_ca", None)
    newest = device_ca.newest(device_id) if device_ca is not None else None
    if newest is not None:
        start, end = newest.not_valid_before_utc, newest.not_valid_after_utc
        if dt.datetime.now(dt.UTC) < start + (end - start) / 2:
            raise DeviceCAError(
                f"the device's newest certificate is valid until {end.isoformat()}; renew after half its lifetime",
                code=ErrorCode.CERTIFICATE_NOT_DUE,
            )
    return issue_device_certificate(app, device_id, csr_pem)
