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


def ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Verification against `ca_bundle` alone when set, else the system store (and SSL_CERT_FILE)."""
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
