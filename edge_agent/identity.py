"""The device's X.509 identity: a key made on the device (never leaves it, 0600), a CSR sent at
enrollment, and the certificate the control plane's device CA returns (CN = device id)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.fsutil import write_atomic


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
