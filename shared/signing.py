"""Ed25519 signatures over canonical JSON, and the refusal every failed check raises.

A signed document is `{"signed": {...}, "signatures": [{"keyid", "sig"}]}` (TUF's envelope); the
signature covers `canonical_json(signed)`. A key's id is the sha256 of its raw public bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from shared.base import WireModel
from shared.canonical import CanonicalJSONError, canonical_json
from shared.errors import SharedError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# cryptography is imported where a key is used, never by the wire models: it costs a serving agent
# about 9 MiB of RSS that only signed releases need (docs/performance.md, "lean agent").

RefusalReason = Literal["bad_signature", "unknown_key", "expired", "rollback", "mismatch", "size_exceeded"]
MAX_SIGNED_BYTES = 64 * 1024  # a release or root document: a bigger one is refused unparsed
MAX_SIGNATURES = 16


class ReleaseRefused(SharedError):
    """Signed metadata, or what a desired state asks under it, failed a check; `reason` says which."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RefusalReason = reason
        self.detail = detail


class Signature(WireModel):
    keyid: str = Field(pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(pattern=r"^[0-9a-f]{128}$")


class SignedMetadata(WireModel):
    signed: dict[str, Any]
    signatures: list[Signature] = Field(default_factory=list, max_length=MAX_SIGNATURES)


def keyid_of(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(bytes.fromhex(public_hex(public))).hexdigest()


def public_hex(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(signed: dict[str, Any], keys: Iterable[Ed25519PrivateKey]) -> SignedMetadata:
    payload = canonical_json(signed)
    signatures = [Signature(keyid=keyid_of(key.public_key()), sig=key.sign(payload).hex()) for key in keys]
    return SignedMetadata(signed=signed, signatures=signatures)


def check_signatures(
    meta: SignedMetadata, *, keys: dict[str, str], allowed: Sequence[str], threshold: int, role: str
) -> None:
    """Raise ReleaseRefused unless `threshold` distinct `allowed` keys signed `meta`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        payload = canonical_json(meta.signed)
    except CanonicalJSONError as exc:
        raise ReleaseRefused("mismatch", f"{role} is not canonical JSON: {exc}") from exc
    if len(payload) > MAX_SIGNED_BYTES:
        raise ReleaseRefused("size_exceeded", f"{role} is {len(payload)} bytes, over {MAX_SIGNED_BYTES}")
    valid: set[str] = set()
    forged: list[str] = []
    for signature in meta.signatures:
        if signature.keyid not in allowed or signature.keyid not in keys:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys[signature.keyid])).verify(
                bytes.fromhex(signature.sig), payload
            )
        except (InvalidSignature, ValueError):
            forged.append(signature.keyid[:12])
            continue
        valid.add(signature.keyid)
    if len(valid) >= threshold:
        return
    if forged:
        raise ReleaseRefused("bad_signature", f"{role} signature by key {', '.join(forged)} does not verify")
    signers = ", ".join(s.keyid[:12] for s in meta.signatures) or "no key"
    raise ReleaseRefused("unknown_key", f"{role} needs {threshold} signature(s) by trusted keys; signed by {signers}")


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """PKCS#8 PEM, readable by its owner only."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(pem)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key
