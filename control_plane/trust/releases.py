"""Release signing: one signed release per model version and rollout step, never one per device.

The control plane holds the online release key and the root chain (`SLMOPS_RELEASE_KEY_FILE`,
`SLMOPS_ROOT_METADATA_FILE`, both made by `slmops keys init`); it never needs the root's private
key. In development without them it makes its own under `<data_dir>/keys` (dev only: that root
key sits next to the server). Serials only grow per model: a rollback or a re-signature is a new
release with a higher serial. Releases due to expire are re-signed (`resign_due`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.errors import ControlPlaneError
from shared.desired import ArtifactRef, DesiredState
from shared.releases import (
    Release,
    ReleaseArtifact,
    Root,
    expires_in,
    new_root,
    parse_root_chain,
    release_document,
)
from shared.signing import SignedMetadata, keyid_of, public_hex, read_private_key, sign, write_private_key

if TYPE_CHECKING:
    from control_plane.config import Settings
    from control_plane.models import Artifact

log = logging.getLogger("slmops.releases")
ROOT_FILE, ROOT_KEY_FILE, RELEASE_KEY_FILE = "root.json", "root.key", "release.key"
ROOT_EXPIRY_S = 365 * 86400.0


class SigningConfigError(ControlPlaneError, ValueError):
    """The release key or root metadata is missing, unreadable or does not fit together."""


def init_keys(out: Path, *, root_expiry_s: float = ROOT_EXPIRY_S) -> None:
    """A root key pair, a release key pair and root.json (version 1) in `out`; refuses to overwrite."""
    paths = [out / ROOT_KEY_FILE, out / RELEASE_KEY_FILE, out / ROOT_FILE]
    if existing := [p.name for p in paths if p.exists()]:
        raise SigningConfigError(f"{out} already holds {', '.join(existing)}; not overwriting keys")
    root_key, release_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = new_root(
        version=1, expires=expires_in(root_expiry_s), root_keys=_keys(root_key), release_keys=_keys(release_key)
    )
    write_private_key(out / ROOT_KEY_FILE, root_key)
    write_private_key(out / RELEASE_KEY_FILE, release_key)
    write_root_chain(out / ROOT_FILE, [sign(signed, [root_key])])


def rotate_root(keys_dir: Path, *, new_root_key: bool, new_release_key: bool) -> int:
    """Append root version N+1 to `keys_dir`/root.json, signed by the old root key and the new one;
    a new release key revokes the old one. Returns the new version."""
    chain = read_root_chain(keys_dir / ROOT_FILE)
    current = Root.model_validate(chain[-1].signed)
    old_root = read_private_key(keys_dir / ROOT_KEY_FILE)
    root_key = Ed25519PrivateKey.generate() if new_root_key else old_root
    release_key = Ed25519PrivateKey.generate() if new_release_key else read_private_key(keys_dir / RELEASE_KEY_FILE)
    signed = new_root(
        version=current.version + 1,
        expires=expires_in(ROOT_EXPIRY_S),
        root_keys=_keys(root_key),
        release_keys=_keys(release_key),
    )
    chain.append(sign(signed, {old_root, root_key}))
    write_private_key(keys_dir / ROOT_KEY_FILE, root_key)
    write_private_key(keys_dir / RELEASE_KEY_FILE, release_key)
    write_root_chain(keys_dir / ROOT_FILE, chain)
    return current.version + 1


def _keys(*keys: Ed25519PrivateKey) -> dict[str, str]:
    return {keyid_of(k.public_key()): public_hex(k.public_key()) for k in keys}


def write_root_chain(path: Path, chain: Sequence[SignedMetadata]) -> None:
    path.write_text(json.dumps([m.model_dump(mode="json", exclude={"schema_version"}) for m in chain], indent=2))


def read_root_chain(path: Path) -> list[SignedMetadata]:
    """root.json: the chain of signed roots, oldest first (one object is a chain of one)."""
    try:
        return parse_root_chain(path.read_bytes())
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise SigningConfigError(f"cannot read root metadata {path}: {exc}") from exc


class ReleaseSigner:
    """Signs releases with the online key; caches one per (version, rollout step, artifacts)."""

    def __init__(self, key: Ed25519PrivateKey, chain: list[SignedMetadata], *, expiry_s: float) -> None:
        if not chain:
            raise SigningConfigError("the root metadata holds no root")
        root = Root.model_validate(chain[-1].signed)
        if keyid_of(key.public_key()) not in root.release_keys:
            raise SigningConfigError(f"the release key is not a release key of root version {root.version}")
        self.key, self.chain, self.expiry_s = key, chain, expiry_s
        # What desired states carry: every device trusts root 1 at least (pinned or from enrollment).
        self.rotations = chain[1:]
        self._lock = threading.Lock()
        self._serials: dict[str, int] = {}  # model -> highest serial issued by this process
        self._cache: dict[tuple[Any, ...], SignedMetadata] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ReleaseSigner:
        key_file, root_file = settings.release_key_file, settings.root_metadata_file
        if (key_file is None) != (root_file is None):
            raise SigningConfigError("set both SLMOPS_RELEASE_KEY_FILE and SLMOPS_ROOT_METADATA_FILE, or neither")
        if key_file is None or root_file is None:
            if settings.environment == "production":
                raise SigningConfigError("production needs SLMOPS_RELEASE_KEY_FILE and SLMOPS_ROOT_METADATA_FILE")
            dev = settings.data_dir / "keys"
            if not (dev / ROOT_FILE).exists():
                log.warning("no release key configured: made development keys in %s (not for production)", dev)
                init_keys(dev)
            key_file, root_file = dev / RELEASE_KEY_FILE, dev / ROOT_FILE
        try:
            key = read_private_key(key_file)
        except (OSError, ValueError) as exc:
            raise SigningConfigError(f"cannot read release key {key_file}: {exc}") from exc
        return cls(key, read_root_chain(root_file), expiry_s=settings.release_expiry_s)

    def release_for(
        self,
        *,
        model: str,
        version: str,
        artifacts: Sequence[Artifact | ArtifactRef | ReleaseArtifact],
        adapter: Artifact | ArtifactRef | ReleaseArtifact | None,
        rollout_id: str | None,
        unload: bool = False,
        cache_key: tuple[Any, ...] | None = None,
    ) -> SignedMetadata:
        items = [_item(a) for a in artifacts]
        extra = _item(adapter) if adapter is not None else None
        shas = tuple(i.sha256 for i in items)
        key = cache_key or (model, version, rollout_id, unload, shas, extra.sha256 if extra else None)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached.signed["serial"] == self._serials.get(model) and not self.due(cached):
                return cached
            serial = max(time.time_ns() // 1000, self._serials.get(model, 0) + 1)
            self._serials[model] = serial
            release = Release(
                model=model,
                version=version,
                serial=serial,
                expires=expires_in(self.expiry_s),
                rollout_id=rollout_id,
                artifacts=items,
                adapter=extra,
                unload=unload,
            )
            signed = self._cache[key] = sign(release_document(release), [self.key])
            return signed

    def forget(self) -> None:
        """Drop the cached releases: the next call signs anew (benchmarks measure that cost)."""
        with self._lock:
            self._cache.clear()

    def due(self, meta: SignedMetadata, *, now: datetime | None = None) -> bool:
        """Whether `meta` is in the last half of its life: time to re-sign it."""
        expires = datetime.fromisoformat(meta.signed["expires"])
        return expires - (now or datetime.now(UTC)) < timedelta(seconds=self.expiry_s / 2)

    def resign(self, state: DesiredState, *, rollout_id: str | None, unload: bool) -> DesiredState:
        """`state` under a new release (higher serial) naming the same artifacts; signed once for
        all the devices whose state names the same old release."""
        old = Release.model_validate(state.release.signed) if state.release is not None else None
        old_id = old.serial if old is not None else state.artifact.sha256
        release = self.release_for(
            cache_key=("resigned", state.model, state.version, old_id, rollout_id, unload),
            model=state.model,
            version=state.version,
            artifacts=old.artifacts if old is not None else [state.artifact],
            adapter=old.adapter if old is not None else state.adapter,
            rollout_id=rollout_id,
            unload=unload,
        )
        return state.model_copy(update={"release": release, "roots": self.rotations, "rollout_id": rollout_id})


def _item(artifact: Artifact | ArtifactRef | ReleaseArtifact) -> ReleaseArtifact:
    if isinstance(artifact, ReleaseArtifact):
        return artifact
    hardware = None
    if not isinstance(artifact, ArtifactRef):  # a registry artifact: its requirements are signed too
        hardware = {"min_ram_mb": artifact.min_ram_mb, "accelerators": artifact.accelerators, "arch": artifact.cpu_arch}
    return ReleaseArtifact(
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        format=artifact.format,
        quantization=artifact.quantization,
        hardware=hardware,
    )


_signer: ReleaseSigner | None = None


def configure(signer: ReleaseSigner | None) -> None:
    """The process's signer (None: desired states go out unsigned, for tests of older devices)."""
    global _signer
    _signer = signer


def current() -> ReleaseSigner | None:
    return _signer
