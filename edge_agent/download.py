"""Resumable, verified artifact downloads into the model store.

Bytes stream into `<sha256>.part`; after an interruption (even kill -9) the next attempt asks for
`Range: bytes=<have>-`. A 206 whose Content-Range does not start where we stopped, or describes
another total, restarts from zero rather than appending the wrong bytes. No more than the declared
size is ever written (a server sending more is refused: `size_exceeded`); the sha256 is checked
before the file is fsynced and renamed into the store.
Redirects are followed here, hop by hop, only where `shared.references.redirect_problem` allows:
never to a weaker scheme, to another host only over https and not into a private network.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import httpx

from edge_agent.errors import DownloadError, InsufficientSpaceError, IntegrityError, TransferError
from edge_agent.fsutil import CHUNK
from edge_agent.store import ModelStore
from shared.desired import ArtifactRef
from shared.references import redirect_problem

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_PROGRESS_EVERY_S = 0.25
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Progress:
    sha256: str
    bytes_done: int
    bytes_total: int
    rate_bps: float  # this attempt's average, bytes per second
    resumed_from: int


ProgressCallback = Callable[[Progress], None]


class _Restart(Exception):
    """The partial file is wrong for this response; truncate and go again."""


class Downloader:
    def __init__(
        self,
        store: ModelStore,
        *,
        client: httpx.Client,
        auth: httpx.Auth | None = None,
        retries: int = 5,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        on_progress: ProgressCallback | None = None,
        on_bytes: Callable[[int], None] | None = None,
        superseded: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        redirect_allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.redirect_allowed_hosts = redirect_allowed_hosts  # private hosts a redirect may lead to
        self.client = client
        self.auth = auth
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.on_progress = on_progress
        self.on_bytes = on_bytes
        self.superseded = superseded
        self.sleep = sleep
        self.rng = rng or random.Random()

    def fetch(
        self, artifact: ArtifactRef, url: str, *, protected: tuple[str, ...] = (), with_auth: bool = True
    ) -> Path:
        """Return the store path of `artifact`, downloading and verifying it unless already stored."""
        if self.store.has(artifact.sha256):
            return self.store.path_for(artifact.sha256)
        self.store.prune(protected + (artifact.sha256,))
        self.check_space(artifact, protected)
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(artifact, url, self.auth if with_auth else None)
            except _Restart as exc:
                log.warning("download %s: %s; restarting from zero", artifact.sha256[:12], exc)
                self.store.partial_path(artifact.sha256).unlink(missing_ok=True)
                last: DownloadError = TransferError(str(exc))
            except TransferError as exc:
                log.warning("download %s attempt %d failed: %s", artifact.sha256[:12], attempt + 1, exc)
                last = exc
            if attempt < self.retries:
                self.sleep(self._backoff(attempt))
        raise TransferError(f"giving up after {self.retries + 1} attempts: {last}", code=last.code)

    def check_space(self, artifact: ArtifactRef, protected: tuple[str, ...]) -> None:
        partial = self.store.partial_path(artifact.sha256)
        have = partial.stat().st_size if partial.exists() else 0
        footprint = self.store.footprint_bytes(artifact)  # a folder bundle is unpacked beside its blob
        still_needed = max(footprint - have, 0)
        free = self.store.free_bytes()
        if still_needed > free:
            raise InsufficientSpaceError(
                f"artifact needs {still_needed} more bytes but the disk has {free} free",
                code="insufficient_disk",
            )
        quota = self.store.quota_bytes
        if quota is not None:
            kept = self.store.used_bytes(only=protected)
            if kept + footprint > quota:
                raise InsufficientSpaceError(
                    f"artifact of {footprint} bytes on disk plus {kept} bytes of kept models "
                    f"exceeds the store quota of {quota} bytes",
                    code="quota_exceeded",
                )

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads a fleet's retries so they do not hit the server in waves.
        return self.rng.uniform(0, min(self.backoff_max_s, self.backoff_s * 2**attempt))

    def _attempt(self, artifact: ArtifactRef, url: str, auth: httpx.Auth | None) -> Path:
        partial = self.store.partial_path(artifact.sha256)
        with partial.open("ab+") as handle:
            have = handle.seek(0, os.SEEK_END)
            if have > artifact.size_bytes:
                raise _Restart(f"partial file larger ({have}) than the artifact ({artifact.size_bytes})")
            # Hash what an earlier attempt left, then the new bytes as they arrive: one pass in all.
            digest = _hash_prefix(handle, have)
            if have < artifact.size_bytes:
                try:
                    digest = self._transfer(handle, artifact, url, have, digest, auth)
                except IntegrityError:
                    partial.unlink(missing_ok=True)
                    raise
            if digest.hexdigest() != artifact.sha256:
                partial.unlink(missing_ok=True)
                raise IntegrityError(f"sha256 mismatch: expected {artifact.sha256}, got {digest.hexdigest()}")
            handle.flush()
            os.fsync(handle.fileno())
        return self.store.install(partial, artifact.sha256)

    def _transfer(
        self,
        handle: BinaryIO,
        artifact: ArtifactRef,
        url: str,
        have: int,
        digest: Hash,
        auth: httpx.Auth | None,
    ) -> Hash:
        # Identity encoding: Range offsets and the declared size count the artifact's own bytes.
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with contextlib.closing(self._open(url, headers, auth)) as response:
                offset = self._start_offset(response, artifact, have)
                if offset != have:
                    handle.truncate(offset)
                    handle.seek(offset)
                    digest = hashlib.sha256()
                sink = _HashingSink(digest, handle.fileno())
                try:
                    self._copy(response, handle, artifact, offset, sink)
                finally:
                    sink.finish()
                return digest
        except httpx.HTTPError as exc:
            raise TransferError(f"{type(exc).__name__}: {exc}") from exc

    def _open(self, url: str, headers: dict[str, str], auth: httpx.Auth | None) -> httpx.Response:
        """The streamed response to GET `url`, after the redirects the rules allow (never followed blindly)."""
        response = self.client.send(
            self.client.build_request("GET", url, headers=headers), auth=auth, stream=True, follow_redirects=False
        )
        hops = 0
        while (target := response.next_request) is not None:  # httpx drops Authorization across origins
            response.close()
            if hops == _MAX_REDIRECTS:
                raise DownloadError(f"more than {_MAX_REDIRECTS} redirects from {url}", code="too_many_redirects")
            problem = redirect_problem(str(response.url), str(target.url), allowed_hosts=self.redirect_allowed_hosts)
            if problem is not None:
                raise DownloadError(f"redirect from {response.url} refused: {problem}", code="redirect_refused")
            response = self.client.send(target, stream=True, follow_redirects=False)
            hops += 1
        return response

    @staticmethod
    def _start_offset(response: httpx.Response, artifact: ArtifactRef, have: int) -> int:
        """Where the response's body starts in the artifact; raises for responses we cannot use."""
        status = response.status_code
        if status == 200:
            return 0  # the server ignored Range: start over with its full body
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if not match or int(match[1]) != have or match[3] not in ("*", str(artifact.size_bytes)):
                raise _Restart(f"206 with Content-Range {response.headers.get('content-range')!r}")
            return have
        if status == 416:
            raise _Restart("server says the range is unsatisfiable")
        if status in (401, 403, 404, 410):
            raise DownloadError(f"artifact refused by the server: HTTP {status}", code=f"http_{status}")
        raise TransferError(f"HTTP {status} from the artifact server")

    def _copy(
        self, response: httpx.Response, handle: BinaryIO, artifact: ArtifactRef, offset: int, digest: _HashingSink
    ) -> None:
        done, started, last_report = offset, time.monotonic(), 0.0
        for block in response.iter_raw():  # as bytes arrive: a dropped link loses none
            room = artifact.size_bytes - done
            if len(block) > room:
                # Endless-data defence: never more than the declared (signed) size is written, and a
                # server sending more is serving another artifact than the one named.
                raise IntegrityError(
                    f"the server sent more than the declared {artifact.size_bytes} bytes; stopped", code="size_exceeded"
                )
            handle.write(block)
            digest.update(block)
            done += len(block)
            if self.on_bytes:
                self.on_bytes(len(block))
            if self.superseded():
                raise DownloadError("a newer command arrived; download stopped (its bytes are kept)", code="superseded")
            now = time.monotonic()
            if self.on_progress and (now - last_report >= _PROGRESS_EVERY_S or done == artifact.size_bytes):
                last_report = now
                rate = (done - offset) / max(now - started, 1e-9)
                self.on_progress(Progress(artifact.sha256, done, artifact.size_bytes, rate, offset))
        if done < artifact.size_bytes:
            raise TransferError(f"connection ended after {done} of {artifact.size_bytes} bytes")


class _HashingSink:
    """sha256 and early write-back on a helper thread, overlapping with the network transfer.

    hashlib releases the GIL on large buffers and fdatasync waits in the kernel, so both run beside
    the receiving thread instead of after it; the final fsync then has little left to flush.
    """

    _SYNC_EVERY = 4 * 1024 * 1024  # small steps keep the final fsync short (docs/performance.md#agent)
    _HAND_OVER = 256 * 1024  # network reads (<= 64 KiB) reach the helper in batches: fewer wake-ups

    def __init__(self, digest: Hash, fd: int) -> None:
        self._digest = digest
        self._fd = fd
        self._pending = bytearray()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=32)  # bounds memory if hashing lags
        self._thread = threading.Thread(target=self._run, name="download-hash", daemon=True)
        self._thread.start()

    def update(self, block: bytes) -> None:
        self._pending += block
        if len(self._pending) >= self._HAND_OVER:
            self._blocks.put(bytes(self._pending))
            self._pending.clear()

    def finish(self) -> None:
        if self._pending:
            self._blocks.put(bytes(self._pending))
            self._pending.clear()
        self._blocks.put(None)
        self._thread.join()

    def _run(self) -> None:
        unsynced = 0
        while (block := self._blocks.get()) is not None:
            self._digest.update(block)
            unsynced += len(block)
            if unsynced >= self._SYNC_EVERY:
                unsynced = 0
                with contextlib.suppress(OSError):  # only a head start; the final fsync reports errors
                    os.fdatasync(self._fd)


def _hash_prefix(handle: BinaryIO, size: int) -> Hash:
    handle.seek(0)
    digest = hashlib.sha256()
    remaining = size
    while remaining and (block := handle.read(min(CHUNK, remaining))):
        digest.update(block)
        remaining -= len(block)
    handle.seek(0, os.SEEK_END)
    return digest
