"""Crash-safe file writes: a reader (or the agent after kill -9) sees the old file or the new one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

CHUNK = 1024 * 1024


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write to a temp file in the same directory, fsync it, rename over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or widened what O_CREAT gave
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files `write_atomic` left in `directory` when the process writing them died
    (kill -9, power loss): `.NAME.PID.tmp` whose process no longer runs. A live writer's (say
    `slmops agent apply` writing the watched file as the agent starts) is left to finish. The file
    they were to replace is intact, so nothing is lost. Returns what was removed."""
    removed = []
    for tmp in directory.glob(".*.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rpartition(".")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed
