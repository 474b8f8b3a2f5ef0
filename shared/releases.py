"""Root and release metadata (TUF's roles, simplified for a fleet) and the checks a device makes.

    root     offline key(s); lists the keys allowed to sign roots and releases, with thresholds.
             Version N+1 is trusted when signed by N's root threshold and by its own.
    release  online key(s) of the control plane; one per model version and rollout step: the
             artifacts a device may run, a serial that only grows per model, an expiry.

Every check raises `shared.signing.ReleaseRefused` with a typed reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator

from shared.base import WireModel
from shared.desired import ArtifactRef, DesiredState
from shared.signing import ReleaseRefused, SignedMetadata, check_signatures

MAX_ROOT_CHAIN = 32
_Doc = TypeVar("_Doc", bound=WireModel)


def whole_seconds(moment: datetime) -> datetime:
    """`moment` in UTC without microseconds: expiries then compare correctly as ISO strings too."""
    return moment.astimezone(UTC).replace(microsecond=0)


class Root(WireModel):
    type: Literal["root"] = "root"
    version: int = Field(ge=1)
    expires: datetime
    keys: dict[str, str] = Field(max_length=64)  # key id -> Ed25519 public key, hex
    root_keys: list[str] = Field(min_length=1, max_length=16)
    root_threshold: int = Field(ge=1)
    release_keys: list[str] = Field(max_length=16)
    release_threshold: int = Field(ge=1)


class ReleaseArtifact(WireModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    format: str
    quantization: str | None = None
    hardware: dict[str, Any] | None = None  # the artifact's requirements, as the registry holds them

    def names(self, ref: ArtifactRef) -> bool:
        return (self.sha256, self.size_bytes, self.format) == (ref.sha256, ref.size_bytes, ref.format)


class Release(WireModel):
    type: Literal["release"] = "release"
    model: str
    version: str
    serial: int = Field(ge=1)
    expires: datetime
    rollout_id: str | None = None
    artifacts: list[ReleaseArtifact] = Field(max_length=64)
    adapter: ReleaseArtifact | None = None
    unload: bool = False  # the signed order to serve nothing (a withdrawal)

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires needs a time zone")
        return value


def parse_root_chain(text: str | bytes) -> list[SignedMetadata]:
    """root.json: the chain of signed roots, oldest first (one object is a chain of one)."""
    raw = json.loads(text)
    items = raw if isinstance(raw, list) else [raw]
    if len(items) > MAX_ROOT_CHAIN:
        raise ValueError(f"root chain of {len(items)} documents, over {MAX_ROOT_CHAIN}")
    return [SignedMetadata.model_validate(item) for item in items]


def update_root(trusted: Root, chain: Sequence[SignedMetadata], *, now: datetime | None) -> Root:
    """Walk `chain` (any order) from `trusted` to the newest root it proves; refuse an expired end
    (`now` None: pinning a root, whose freshness every later verification checks)."""
    if len(chain) > MAX_ROOT_CHAIN:
        raise ReleaseRefused("size_exceeded", f"root chain of {len(chain)} documents, over {MAX_ROOT_CHAIN}")
    by_version = {meta.signed.get("version"): meta for meta in chain}
    while (meta := by_version.get(trusted.version + 1)) is not None:
        check_signatures(
            meta, keys=trusted.keys, allowed=trusted.root_keys, threshold=trusted.root_threshold, role="root"
        )
        new = _parse(Root, meta, "root")
        check_signatures(meta, keys=new.keys, allowed=new.root_keys, threshold=new.root_threshold, role="root")
        trusted = new
    if now is not None and trusted.expires <= now:
        raise ReleaseRefused("expired", f"root version {trusted.version} expired at {trusted.expires.isoformat()}")
    return trusted


def verify_release(root: Root, meta: SignedMetadata, *, now: datetime, highest_serial: int | None) -> Release:
    """The release `meta` holds, once signed by the root's release keys, fresh and not older than
    the highest serial accepted for its model (the same serial again is the same release)."""
    check_signatures(meta, keys=root.keys, allowed=root.release_keys, threshold=root.release_threshold, role="release")
    release = _parse(Release, meta, "release")
    if release.expires <= now:
        raise ReleaseRefused("expired", f"release {release.serial} of {release.model} expired at {release.expires}")
    if highest_serial is not None and release.serial < highest_serial:
        raise ReleaseRefused(
            "rollback", f"release serial {release.serial} of {release.model} is below {highest_serial}, already seen"
        )
    return release


def check_desired(release: Release, desired: DesiredState) -> None:
    """Refuse a desired state asking for anything its release does not sign (mix-and-match)."""
    problems = []
    if (desired.model, desired.version) != (release.model, release.version):
        problems.append(f"names {desired.model} {desired.version}, the release {release.model} {release.version}")
    if desired.unload != release.unload or desired.rollout_id != release.rollout_id:
        problems.append("its unload flag or rollout differs from the release's")
    if not any(item.names(desired.artifact) for item in release.artifacts):
        problems.append(f"artifact {desired.artifact.sha256[:12]} is not in the release")
    if (desired.adapter is None) != (release.adapter is None) or (
        desired.adapter is not None and release.adapter is not None and not release.adapter.names(desired.adapter)
    ):
        problems.append("its adapter is not the release's")
    if problems:
        raise ReleaseRefused("mismatch", "desired state " + "; ".join(problems))


def new_root(
    *, version: int, expires: datetime, root_keys: dict[str, str], release_keys: dict[str, str], threshold: int = 1
) -> dict[str, Any]:
    """The `signed` part of a root document (keys: key id -> public key hex)."""
    root = Root(
        version=version,
        expires=whole_seconds(expires),
        keys={**root_keys, **release_keys},
        root_keys=sorted(root_keys),
        root_threshold=threshold,
        release_keys=sorted(release_keys),
        release_threshold=1,
    )
    return root.model_dump(mode="json", exclude={"schema_version"})


def release_document(release: Release) -> dict[str, Any]:
    return release.model_dump(mode="json", exclude={"schema_version"}, exclude_none=True)


def expires_in(seconds: float, *, now: datetime | None = None) -> datetime:
    return whole_seconds((now or datetime.now(UTC)) + timedelta(seconds=seconds))


def _parse(model: type[_Doc], meta: SignedMetadata, role: str) -> _Doc:
    try:
        return model.model_validate(meta.signed)
    except ValidationError as exc:
        raise ReleaseRefused("mismatch", f"signed {role} is not a valid {role} document: {exc.errors()[:1]}") from exc
