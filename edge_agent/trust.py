"""The device's trust in releases (shared.releases): a pinned root, walked forward along the root
chains desired states carry, and the highest release serial accepted per model, kept across
restarts in `<data_dir>/trust.json`.

The root is pinned at install (`root_metadata_file` in the agent config: the operator's root.json)
or, without one, trusted on first use at enrollment: the chain the control plane answers the
enrollment with. With neither (a standalone agent fed by a local file) releases are not verified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from edge_agent.fsutil import write_atomic
from shared.desired import DesiredState
from shared.releases import Release, Root, check_desired, update_root, verify_release
from shared.signing import ReleaseRefused, SignedMetadata

log = logging.getLogger(__name__)


class TrustState(BaseModel):
    root: dict[str, Any]  # the `signed` part of the newest root this device verified
    serials: dict[str, int] = Field(default_factory=dict)  # model -> highest release serial accepted


@dataclass(frozen=True)
class Verified:
    release: Release
    root: Root


class ReleaseGuard:
    """Verifies desired states against the trusted root; `accept` remembers what was verified."""

    def __init__(self, path: Path | None, state: TrustState) -> None:
        """`path` None: what was accepted is kept in memory only (a simulated device)."""
        self.path = path
        self.state = state
        self.root = Root.model_validate(state.root)

    @classmethod
    def in_memory(cls, pinned: list[SignedMetadata]) -> ReleaseGuard:
        """A guard trusting the newest root `pinned` proves, remembering nothing across restarts."""
        root = update_root(Root.model_validate(pinned[0].signed), pinned, now=None)
        return cls(None, TrustState(root=root.model_dump(mode="json")))

    @classmethod
    def load(cls, path: Path, *, pinned: list[SignedMetadata] | None) -> ReleaseGuard | None:
        """The guard from trust.json and the provisioned chain (the newer root wins); None when
        this device has no root to trust."""
        stored = _read(path)
        if pinned:
            root = update_root(Root.model_validate(pinned[0].signed), pinned, now=None)
            if stored is None or Root.model_validate(stored.root).version < root.version:
                serials = stored.serials if stored is not None else {}
                stored = TrustState(root=root.model_dump(mode="json"), serials=serials)
                write_atomic(path, stored.model_dump_json().encode())
        return cls(path, stored) if stored is not None else None

    @staticmethod
    def pin_on_enrollment(path: Path, chain: list[SignedMetadata]) -> None:
        """Trust on first use: the root chain the control plane sent at enrollment, walked to its end."""
        if path.exists() or not chain:
            return
        root = update_root(Root.model_validate(chain[0].signed), chain, now=None)
        write_atomic(path, TrustState(root=root.model_dump(mode="json")).model_dump_json().encode())
        log.info("trusting root version %d received at enrollment", root.version)

    def verify(self, desired: DesiredState, *, now: datetime | None = None) -> Verified:
        """Raise ReleaseRefused unless `desired` is covered by a fresh release signed under the root."""
        now = now or datetime.now(UTC)
        if desired.release is None:
            raise ReleaseRefused("unknown_key", "the desired state names no signed release")
        root = update_root(self.root, desired.roots, now=now)
        highest = self._serials_under(root).get(desired.model)
        release = verify_release(root, desired.release, now=now, highest_serial=highest)
        check_desired(release, desired)
        return Verified(release, root)

    def accept(self, verified: Verified) -> None:
        """Remember the release's serial (a lower one is a rollback from now on) and the root."""
        release = verified.release
        serials = dict(self._serials_under(verified.root))
        serials[release.model] = max(serials.get(release.model, 0), release.serial)
        if serials == self.state.serials and verified.root.version == self.root.version:
            return
        self.state = TrustState(root=verified.root.model_dump(mode="json"), serials=serials)
        self.root = verified.root
        if self.path is not None:
            write_atomic(self.path, self.state.model_dump_json().encode())

    def _serials_under(self, root: Root) -> dict[str, int]:
        """The serials remembered, or none once `root` changed the release keys: the old keys can
        sign nothing the device accepts any more, and a huge serial one of them signed (a
        fast-forward by a leaked key) must not make every genuine release a rollback (TUF 5.3.11)."""
        if set(root.release_keys) != set(self.root.release_keys):
            return {}
        return self.state.serials


def release_of(desired: DesiredState) -> Release | None:
    """The release a desired state carries, read without verification (it was verified before)."""
    if desired.release is None:
        return None
    try:
        return Release.model_validate(desired.release.signed)
    except ValidationError:
        return None


def _read(path: Path) -> TrustState | None:
    try:
        return TrustState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        # Refusing everything is safer than trusting nothing silently: the operator must re-provision.
        raise ReleaseRefused("bad_signature", f"trust file {path} is unreadable: {exc}") from exc
