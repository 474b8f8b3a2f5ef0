"""Content-addressed model store: `<data_dir>/store/sha256/<hex>`, partial downloads beside it.

A blob appears in the store only by an atomic rename after its sha256 matched, so a file there is
whole; it is still re-verified before the agent serves it after a restart. An ONNX model folder
("onnx-tar" blob) is unpacked once, from its verified blob, into `<data_dir>/store/unpacked/<hex>/`
by extracting into a temporary directory and renaming it: a directory there is whole too. It goes
when its blob goes (pruned, or failing verification).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from edge_agent.fsutil import fsync_dir
from shared.desired import BUNDLE_FORMAT, ArtifactRef
from shared.hashing import file_sha256

log = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, data_dir: Path, *, keep_versions: int = 2, quota_bytes: int | None = None) -> None:
        self.blobs = data_dir / "store" / "sha256"
        self.unpacked = data_dir / "store" / "unpacked"
        self.partials = data_dir / "downloads"
        self.keep_versions = keep_versions
        self.quota_bytes = quota_bytes
        for directory in (self.blobs, self.unpacked, self.partials):
            directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.blobs / sha256

    def unpacked_path(self, sha256: str) -> Path:
        return self.unpacked / sha256

    @staticmethod
    def footprint_bytes(artifact: ArtifactRef) -> int:
        """Disk an artifact takes once stored: a folder bundle keeps its blob and, at most as large, its files."""
        return artifact.size_bytes * (2 if artifact.format == BUNDLE_FORMAT else 1)

    def model_path(self, artifact: ArtifactRef) -> Path:
        """What a runtime loads: the blob itself, or the .onnx graph inside the unpacked folder bundle."""
        if artifact.format != BUNDLE_FORMAT:
            return self.path_for(artifact.sha256)
        return self.unpack(artifact.sha256)

    def unpack(self, sha256: str) -> Path:
        """Unpack a stored (verified) folder bundle once; returns its .onnx graph. Raises BundleError, OSError."""
        from shared.formats.onnx_bundle import extract_bundle, find_graph  # tarfile only on devices that need it

        target = self.unpacked_path(sha256)
        if not target.is_dir():
            staging = self.unpacked / f".{sha256}.tmp"
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-unpack
            try:
                extract_bundle(self.path_for(sha256), staging)
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(self.unpacked)
        return find_graph(target)

    def partial_path(self, sha256: str) -> Path:
        return self.partials / f"{sha256}.part"

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def verify(self, sha256: str) -> bool:
        """Re-hash a stored blob; a blob that no longer matches is removed."""
        path = self.path_for(sha256)
        if not path.is_file():
            return False
        if file_sha256(path) == sha256:
            return True
        log.error("stored model %s failed verification; removing it", sha256[:12])
        self._remove(sha256)
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
                total += path.stat().st_size + _tree_bytes(self.unpacked_path(path.name))
        return total

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.blobs).free

    def prune(self, protected: Iterable[str]) -> list[str]:
        """Remove blobs beyond `keep_versions`, oldest first; `protected` ones are never removed."""
        keep = {sha for sha in protected if sha}
        others = sorted((p for p in self._blobs() if p.name not in keep), key=lambda p: p.stat().st_mtime, reverse=True)
        room = max(self.keep_versions - len(keep), 0)
        removed = []
        for path in others[room:]:
            self._remove(path.name)
            removed.append(path.name)
        for partial in self.partials.glob("*.part"):
            if partial.name.removesuffix(".part") not in keep:
                partial.unlink(missing_ok=True)
        stored = {p.name for p in self._blobs()}
        for folder in self.unpacked.iterdir():  # staging left by a crash, or a folder whose blob is gone
            if folder.name not in stored:
                _remove_tree(folder)
        return removed

    def _remove(self, sha256: str) -> None:
        # The folder first: a crash in between leaves a blob that unpacks again, never a folder without one.
        _remove_tree(self.unpacked_path(sha256))
        self.path_for(sha256).unlink(missing_ok=True)

    def _blobs(self) -> list[Path]:
        with contextlib.suppress(FileNotFoundError):
            return [p for p in self.blobs.iterdir() if p.is_file() and len(p.name) == 64]
        return []


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
