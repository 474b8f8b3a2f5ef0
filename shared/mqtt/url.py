"""Broker URLs: mqtt://user:pass@host:1883 or mqtts://host:8883 (TLS); a cluster's nodes as a
comma-separated list of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

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


def parse_broker_urls(text: str) -> list[BrokerURL]:
    """The URLs of a broker cluster's nodes, comma-separated; one URL is a list of one.

    Credentials given in one URL apply to every URL that names none, so a password is written
    once. All must agree on TLS: one client has one TLS setup.
    """
    urls = [parse_broker_url(part.strip()) for part in text.split(",") if part.strip()]
    if not urls:
        raise BrokerURLError(f"no broker URL in {text!r}")
    if len({url.tls for url in urls}) > 1:
        raise BrokerURLError(f"broker URLs mix mqtt:// and mqtts://: {text!r}")
    named = [url for url in urls if url.username is not None]
    if len({(url.username, url.password) for url in named}) > 1:
        raise BrokerURLError("broker URLs name different credentials; give them once")
    if named:
        urls = [url if url.username is not None else url.with_credentials(named[0].username, named[0].password)
                for url in urls]  # fmt: skip
    return urls


def format_broker_url(url: BrokerURL) -> str:
    """`url` as text again, with its credentials (percent-encoded)."""
    auth = ""
    if url.username is not None:
        auth = quote(url.username, safe="") + (f":{quote(url.password, safe='')}" if url.password else "") + "@"
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{'mqtts' if url.tls else 'mqtt'}://{auth}{host}:{url.port}"
