"""Content-addressed model store: `<data_dir>/store/sha256/<hex>`, partial downloads beside it.

A blob appears in the store only by an atomic rename after its sha256 matched, so a file there is
whole; it is still re-verified before the agent serves it after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from edge_agent.fsutil import fsync_dir, sha256_file

log = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, data_dir: Path, *, keep_versions: int = 2, quota_bytes: int | None = None) -> None:
        self.blobs = data_dir / "store" / "sha256"
        self.partials = data_dir / "downloads"
        self.keep_versions = keep_versions
        self.quota_bytes = quota_bytes
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partials.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.blobs / sha256

    def partial_path(self, sha256: str) -> Path:
        return self.partials / f"{sha256}.part"

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def verify(self, sha256: str) -> bool:
        """Re-hash a stored blob; a blob that no longer matches is removed."""
        path = self.path_for(sha256)
        if not path.is_file():
            return False
        if sha256_file(path) == sha256:
            return True
        log.error("stored model %s failed verification; removing it", sha256[:12])
        path.unlink(missing_ok=True)
        return False

    def install(self, partial: Path, sha256: str) -> Path:
        """Move a verified, fsynced partial into the store atomically."""
        target = self.path_for(sha256)
        os.replace(partial, target)
        fsync_dir(self.blobs)
        return target

    def used_bytes(self, only: Iterable[str] | None = None) -> int:
        wanted = set(only) if only is not None else None
        total = 0
        for path in self._blobs():
            if wanted is None or path.name in wanted:
                total += path.stat().st_size
        return total

    def partial_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.partials.glob("*.part"))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.blobs).free

    def prune(self, protected: Iterable[str]) -> list[str]:
        """Remove blobs beyond `keep_versions`, oldest first; `protected` ones are never removed."""
        keep = {sha for sha in protected if sha}
        others = sorted((p for p in self._blobs() if p.name not in keep), key=lambda p: p.stat().st_mtime, reverse=True)
        room = max(self.keep_versions - len(keep), 0)
        removed = []
        for path in others[room:]:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        for partial in self.partials.glob("*.part"):
            if partial.name.removesuffix(".part") not in keep:
                partial.unlink(missing_ok=True)
        return removed

    def _blobs(self) -> list[Path]:
        with contextlib.suppress(FileNotFoundError):
            return [p for p in self.blobs.iterdir() if p.is_file() and len(p.name) == 64]
        return []
