"""Broker URLs: mqtt://user:pass@host:1883 or mqtts://host:8883 (TLS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from shared.mqtt.errors import BrokerURLError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        return BrokerURL(self.host, self.port, self.tls, username, password)

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise BrokerURLError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise BrokerURLError(f"broker URL has no host: {url!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise BrokerURLError(f"broker URL has an invalid port: {url!r}") from exc
    return BrokerURL(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
