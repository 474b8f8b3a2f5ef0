"""The sha256 of a file, as artifacts are named and checked everywhere (hex, lower case)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

CHUNK = 1024 * 1024  # read a file in 1 MiB blocks: memory stays flat whatever the artifact's size


def file_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The hex sha256 of `path`'s bytes; `on_bytes(n)` after each block read (a progress bar)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()
