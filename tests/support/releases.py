"""Keys and signed documents for the release tests: a root and a release key made per test."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.desired import ArtifactRef, DesiredState
from shared.releases import Release, ReleaseArtifact, Root, expires_in, new_root, release_document
from shared.signing import SignedMetadata, keyid_of, public_hex, sign

DAY_S = 86400.0


def key_map(*keys: Ed25519PrivateKey) -> dict[str, str]:
    return {keyid_of(k.public_key()): public_hex(k.public_key()) for k in keys}


@dataclass
class Authority:
    """An operator's keys: root key(s) (offline), release key(s) (online), and the root chain."""

    root_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    release_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    chain: list[SignedMetadata] = field(default_factory=list)
    serial: int = 0

    def __post_init__(self) -> None:
        signed = new_root(
            version=1,
            expires=expires_in(365 * DAY_S),
            root_keys=key_map(self.root_key),
            release_keys=key_map(self.release_key),
        )
        self.chain.append(sign(signed, [self.root_key]))

    @property
    def root(self) -> Root:
        return Root.model_validate(self.chain[-1].signed)

    def rotate(
        self, *, root_key: Ed25519PrivateKey | None = None, release_key: Ed25519PrivateKey | None = None
    ) -> None:
        """Root version + 1, signed by the old and the new root key; revokes the old release key."""
        old_root = self.root_key
        self.root_key = root_key or self.root_key
        self.release_key = release_key or Ed25519PrivateKey.generate()
        signed = new_root(
            version=self.root.version + 1,
            expires=expires_in(365 * DAY_S),
            root_keys=key_map(self.root_key),
            release_keys=key_map(self.release_key),
        )
        self.chain.append(sign(signed, {old_root, self.root_key}))

    def release(
        self,
        artifacts: list[ArtifactRef],
        *,
        model: str = "m",
        version: str = "1.0",
        serial: int | None = None,
        expires: datetime | None = None,
        rollout_id: str | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> SignedMetadata:
        if serial is None:
            self.serial += 1
            serial = self.serial
        release = Release(
            model=model,
            version=version,
            serial=serial,
            expires=expires or expires_in(DAY_S),
            rollout_id=rollout_id,
            artifacts=[ReleaseArtifact(sha256=a.sha256, size_bytes=a.size_bytes, format=a.format) for a in artifacts],
        )
        return sign(release_document(release), [key or self.release_key])

    def desired(self, artifact: ArtifactRef, **options: Any) -> DesiredState:
        """A desired state for `artifact` under a fresh signed release (options go to `release`)."""
        model, version = options.get("model", "m"), options.get("version", "1.0")
        release = self.release([artifact], **options)
        return DesiredState(
            message_id=f"{model}-{version}-{release.signed['serial']}",
            model=model,
            version=version,
            artifact=artifact,
            rollout_id=options.get("rollout_id"),
            release=release,
            roots=list(self.chain),
        )


def past(seconds: float = 60.0) -> datetime:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).replace(microsecond=0)
