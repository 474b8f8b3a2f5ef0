"""Content-addressed blob storage: `blobs/sha256/<hex>`, written via temp file + atomic rename.

A `BlobWriter` is fed chunks as they arrive from the network: it hashes while writing, enforces
the size limit before each write (so the disk never holds more than the limit for one upload),
and either commits (verify, fsync, rename) or aborts (unlink). Identical content is stored once.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from control_plane.errors import DomainError, ErrorCode


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    storage_key: str
    deduplicated: bool  # the content was already stored; this upload's bytes were discarded


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size_bytes: int
    modified: float  # POSIX seconds of the last write (or refresh by a deduplicated upload)


SHA256_NAME = re.compile(r"[0-9a-f]{64}")  # only such names are blobs; anything else is left alone


class BlobWriter:
    def __init__(self, store: LocalBlobStore, max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0
        store.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)
        self.temp_path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._closed = False

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self._max_bytes:
            self.abort()
            raise DomainError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"artifact exceeds the upload limit of {self._max_bytes} bytes",
                limit_bytes=self._max_bytes,
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish_writing(self) -> None:
        """Flush and fsync; the temp file stays so it can be inspected (sniffed) before commit."""
        if not self._closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True

    def verify(self, declared_sha256: str | None) -> None:
        """Refuse (and remove) the bytes when they are not what the client declared."""
        digest = self.sha256
        if declared_sha256 and declared_sha256.lower() != digest:
            self.abort()
            raise DomainError(
                ErrorCode.SHA256_MISMATCH,
                "the uploaded bytes do not match the declared sha256; nothing was stored",
                declared_sha256=declared_sha256.lower(),
                computed_sha256=digest,
            )

    def commit(self, declared_sha256: str | None = None) -> StoredBlob:
        self.finish_writing()
        self.verify(declared_sha256)
        return self._store.adopt(self.temp_path, self.sha256, self.size)

    def abort(self) -> None:
        if not self._closed:
            self._file.close()
            self._closed = True
        self.temp_path.unlink(missing_ok=True)


class BlobStore(Protocol):
    def writer(self, max_bytes: int) -> BlobWriter: ...
    def path_for(self, sha256: str) -> Path: ...
    def exists(self, sha256: str) -> bool: ...
    def download_url(self, sha256: str) -> str | None: ...
    def list_blobs(self) -> Iterator[BlobInfo]: ...
    def stat(self, sha256: str) -> BlobInfo | None: ...
    def delete(self, sha256: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"

    @staticmethod
    def key_for(sha256: str) -> str:
        return f"blobs/sha256/{sha256}"

    def path_for(self, sha256: str) -> Path:
        return self.local_file(sha256)

    def local_file(self, sha256: str) -> Path:
        """Where this replica's disk holds the blob (the S3 store's scratch copy)."""
        return self.root / "sha256" / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def writer(self, max_bytes: int) -> BlobWriter:
        return BlobWriter(self, max_bytes)

    def list_blobs(self) -> Iterator[BlobInfo]:
        folder = self.root / "sha256"
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        for name in names:
            info = self.stat(name) if SHA256_NAME.fullmatch(name) else None
            if info is not None:
                yield info

    def stat(self, sha256: str) -> BlobInfo | None:
        try:
            found = self.local_file(sha256).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(sha256, found.st_size, found.st_mtime)

    def delete(self, sha256: str) -> None:
        self.local_file(sha256).unlink(missing_ok=True)

    def download_url(self, sha256: str) -> str | None:
        """Where devices fetch the bytes from other than the artifact route; None: the route serves them."""
        return None

    def adopt(self, temp_path: Path, sha256: str, size: int) -> StoredBlob:
        final = self.path_for(sha256)
        if final.is_file() and final.stat().st_size == size:
            temp_path.unlink(missing_ok=True)
            os.utime(final)  # a fresh reference: garbage collection's grace period starts again
            return StoredBlob(sha256, size, self.key_for(sha256), deduplicated=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp_path, final)  # atomic on POSIX: readers see the old name or the whole file
        _fsync_dir(final.parent)
        return StoredBlob(sha256, size, self.key_for(sha256), deduplicated=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
