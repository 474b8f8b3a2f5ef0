"""Where artifact bytes may come from: the rules for registered references and for redirects.

Both sides keep the same rules: the control plane when an operator registers a reference, the
agent on every redirect it is asked to follow. A reference is `https://`, holds no credentials and
names a public host. Hosts are judged as written: IP literals (IPv4 in any form the C resolver
reads, IPv6 forms that carry an IPv4 address judged as that address) and `localhost` names are checked; other DNS names
are not resolved, since the answer at registration says nothing about the answer at download.
An allow-list (names, addresses or CIDR networks) admits private targets such as a LAN mirror.
A reference is shown (and audited) without its credentials and with its query string's secrets
redacted; devices get it whole.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import SplitResult, unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway or the host itself reaches.
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(n)
    for n in ("::ffff:0:0/96", "64:ff9b::/96", "::ffff:0:0:0/96", "::/96")  # mapped, NAT64, SIIT, compatible
)
# Query parameters that hold a secret (presigned S3/GCS/CloudFront/Azure SAS URLs, bearer tokens).
_SECRET_PARAMETER = re.compile(r"sig|token|credential|secret|password|key|auth", re.IGNORECASE)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")  # punycode for IDNs
_DEFAULT_PORTS = {"http": 80, "https": 443}


def reference_problem(url: str, *, allowed_hosts: Iterable[str] = ()) -> str | None:
    """Why `url` may not be registered as an artifact reference; None when it may."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return "s3:// references are not supported yet: give an https:// URL (a presigned one works) or upload the file"
    if scheme != "https":
        return f"{scheme}:// references are not supported: give an https:// URL"
    return target_problem(parts, allowed_hosts=allowed_hosts)


def target_problem(parts: SplitResult, *, allowed_hosts: Iterable[str] = ()) -> str | None:
    """Why the host and credentials of `parts` make it no place to fetch an artifact from."""
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "the URL holds credentials (user:password@host): they would be shown to every viewer and device"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "the URL names no host"
    address, problem = _literal_address(host)
    if problem:
        return problem
    if _allowed(host, address, allowed_hosts):
        return None
    if address is None:
        if host == "localhost" or host.endswith(".localhost"):
            return f"{host} is this machine (loopback); add it to the allow-list to permit it"
        return None
    if not address.is_global or address.is_multicast:
        return (
            f"{address} is a loopback, link-local, private or reserved address; add it to the allow-list to permit it"
        )
    return None


def redirect_problem(source: str, target: str, *, allowed_hosts: Iterable[str] = ()) -> str | None:
    """Why a download may not follow a redirect from `source` to `target`; None when it may.

    Never to a weaker scheme; to another host only over https and under the reference rules.
    """
    try:
        src, dst = urlsplit(source), urlsplit(target)
        same_origin = _origin(src)[1:] == _origin(dst)[1:]
    except ValueError as exc:
        return f"redirect to an invalid URL ({exc})"
    if dst.scheme not in _DEFAULT_PORTS:
        return f"redirect to a {dst.scheme or 'relative'}:// URL"
    if src.scheme == "https" and dst.scheme != "https":
        return f"redirect from https to {dst.scheme} (a downgrade) refused"
    if same_origin:
        return None
    if dst.scheme != "https":
        return f"redirect to another host ({dst.hostname}) over plain http refused"
    return target_problem(dst, allowed_hosts=allowed_hosts)


def without_credentials(url: str) -> str:
    """`url` with any `user:password@` removed, for showing a reference stored before these rules."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def shown_reference(url: str) -> str:
    """`url` as viewers and the audit log see it: no credentials, query-string secrets redacted."""
    shown = without_credentials(url)
    base, mark, query = shown.partition("?")
    if not mark:
        return shown
    query, hashmark, fragment = query.partition("#")
    pairs = [p.partition("=") for p in query.split("&")]
    redacted = "&".join(f"{k}={'REDACTED' if _SECRET_PARAMETER.search(unquote(k)) else v}" if eq else k
                        for k, eq, v in pairs)  # fmt: skip
    return f"{base}?{redacted}{hashmark}{fragment}"


def _embedded_ipv4(v6: ipaddress.IPv6Address) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, SIIT, compatible, 6to4), else itself."""
    if v6.sixtofour is not None:
        return v6.sixtofour
    if int(v6) > 1 and any(v6 in network for network in _IPV4_IN_LAST_32_BITS):  # :: and ::1 stay IPv6
        return ipaddress.IPv4Address(int(v6) & 0xFFFFFFFF)
    return v6


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    return parts.scheme, (parts.hostname or "").rstrip("."), parts.port or _DEFAULT_PORTS.get(parts.scheme)


def _literal_address(host: str) -> tuple[IPAddress | None, str | None]:
    """The address `host` spells, or None for a DNS name; a problem for hosts no one should write."""
    if ":" in host:
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError:
            return None, f"{host!r} is not a valid IPv6 address"
        return _embedded_ipv4(v6), None
    if not _NAME.match(host):
        return None, f"{host!r} is not a valid host name (write international names in punycode)"
    try:
        packed = socket.inet_aton(host)  # also reads 127.1, 0x7f.0.0.1 and 2130706433, as connect() would
    except OSError:
        return None, None
    v4 = ipaddress.IPv4Address(packed)
    if str(v4) != host:
        return None, f"{host!r} is an IPv4 address in an unusual form: write it as {v4}"
    return v4, None


def _allowed(host: str, address: IPAddress | None, entries: Iterable[str]) -> bool:
    for entry in entries:
        entry = entry.strip().lower().rstrip(".").strip("[]")
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if host == entry:
                return True
            continue
        if address is not None and address.version == network.version and address in network:
            return True
    return False
