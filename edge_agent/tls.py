"""Transport security of the agent: no credential over plaintext off loopback, trust from `ca_bundle`."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit

_PLAINTEXT_SCHEMES = {"http": "https", "mqtt": "mqtts"}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_problem(url: str) -> str | None:
    """Why `url` would carry the device credential in clear over a network; None when it would not."""
    parts = urlsplit(url)
    secure = _PLAINTEXT_SCHEMES.get(parts.scheme)
    if secure is None or is_loopback(parts.hostname or ""):
        return None
    return (
        f"{parts.scheme}:// to {parts.hostname} would send the device credential in clear: use {secure}:// "
        "(or set allow_insecure_http = true for development)"
    )


def has_identity(cert_path: Path, key_path: Path) -> bool:
    """True when the device holds a certificate and its key (X.509 identity)."""
    return cert_path.is_file() and key_path.is_file()


def ssl_context(ca_bundle: Path | None, identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Verification against `ca_bundle` alone when set, else the system store (and SSL_CERT_FILE);
    `identity` = (certificate, key) presented to a server that asks for one."""
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    if identity is not None:
        context.load_cert_chain(str(identity[0]), str(identity[1]))
    return context
