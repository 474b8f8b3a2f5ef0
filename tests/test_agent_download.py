"""The agent's downloader against a real HTTP server that can misbehave."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.download import Downloader, Progress
from edge_agent.errors import DownloadError, InsufficientSpaceError, IntegrityError
from edge_agent.store import ModelStore
from shared.desired import ArtifactRef
from shared.hashing import file_sha256
from tests.support.agent import ArtifactServer, Misbehaviour
from tests.support.server_thread import ServerThread

PAYLOAD = random.Random(7).randbytes(1_500_000)


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    artifacts = ArtifactServer()
    with ServerThread(artifacts.app()) as thread:
        artifacts.port = thread.port
        yield artifacts


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data", keep_versions=2)


def make_downloader(store: ModelStore, progress: list[Progress] | None = None, retries: int = 3) -> Downloader:
    return Downloader(
        store,
        client=httpx.Client(timeout=10),
        retries=retries,
        backoff_s=0.01,
        on_progress=progress.append if progress is not None else None,
        sleep=lambda s: None,
    )


def ref(sha: str, size: int = len(PAYLOAD)) -> ArtifactRef:
    return ArtifactRef(sha256=sha, size_bytes=size, format="gguf")


def url(server: ArtifactServer, sha: str) -> str:
    return f"{server.url}/v1/artifacts/{sha}"


def test_download_verifies_and_installs_into_content_addressed_store(server, store) -> None:
    sha = server.add(PAYLOAD)
    progress: list[Progress] = []
    path = make_downloader(store, progress).fetch(ref(sha), url(server, sha))
    assert path == store.path_for(sha)
    assert path.read_bytes() == PAYLOAD
    assert not store.partial_path(sha).exists()
    assert progress[-1].bytes_done == len(PAYLOAD) and progress[-1].rate_bps > 0
    assert server.ranges_for(sha) == [None]
    # A second fetch finds it in the store and makes no request.
    make_downloader(store).fetch(ref(sha), url(server, sha))
    assert len(server.ranges_for(sha)) == 1


def test_resume_asks_for_the_missing_range_only(server, store) -> None:
    sha = server.add(PAYLOAD)
    store.partial_path(sha).write_bytes(PAYLOAD[:600_000])
    path = make_downloader(store).fetch(ref(sha), url(server, sha))
    assert server.ranges_for(sha) == ["bytes=600000-"]
    assert file_sha256(path) == sha


def test_dropped_connection_is_retried_from_where_it_stopped(server, store) -> None:
    sha = server.add(PAYLOAD, Misbehaviour(drop_after=400_000))
    path = make_downloader(store).fetch(ref(sha), url(server, sha))
    ranges = server.ranges_for(sha)
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0
    assert file_sha256(path) == sha


def test_wrong_content_range_restarts_instead_of_appending(server, store) -> None:
    sha = server.add(PAYLOAD, Misbehaviour(wrong_content_range=1))
    store.partial_path(sha).write_bytes(PAYLOAD[:300_000])
    path = make_downloader(store).fetch(ref(sha), url(server, sha))
    assert server.ranges_for(sha) == ["bytes=300000-", None]
    assert path.read_bytes() == PAYLOAD


def test_a_server_sending_more_than_the_declared_size_is_refused(server, store) -> None:
    """Endless data: the download stops at the declared (signed) size, keeps nothing and says why."""
    sha = server.add(PAYLOAD, Misbehaviour(extra_bytes=5_000_000))
    with pytest.raises(IntegrityError) as caught:
        make_downloader(store).fetch(ref(sha), url(server, sha))
    assert caught.value.code == "size_exceeded"
    assert not store.has(sha)
    assert not store.partial_path(sha).exists()


def test_server_claiming_a_shorter_size_is_refused(server, store) -> None:
    sha = server.add(PAYLOAD)
    with pytest.raises(IntegrityError):
        make_downloader(store).fetch(ref(sha, size=len(PAYLOAD) - 10), url(server, sha))
    assert not store.has(sha)
    assert not store.partial_path(sha).exists()


def test_corrupted_artifact_is_refused_and_discarded(server, store) -> None:
    sha = server.add(PAYLOAD, Misbehaviour(corrupt=True))
    with pytest.raises(IntegrityError) as caught:
        make_downloader(store).fetch(ref(sha), url(server, sha))
    assert caught.value.code == "integrity_check_failed"
    assert not store.has(sha)
    assert not store.partial_path(sha).exists()


def test_missing_artifact_fails_without_retrying(server, store) -> None:
    sha = hashlib.sha256(b"nothing here").hexdigest()
    with pytest.raises(DownloadError) as caught:
        make_downloader(store).fetch(ref(sha, size=12), url(server, sha))
    assert caught.value.code == "http_404"
    assert len(server.ranges_for(sha)) == 1


def test_quota_refuses_before_downloading(server, tmp_path) -> None:
    store = ModelStore(tmp_path / "data", keep_versions=2, quota_bytes=2_000_000)
    kept = server.add(PAYLOAD)
    make_downloader(store).fetch(ref(kept), url(server, kept))
    other = server.add(PAYLOAD[::-1])
    with pytest.raises(InsufficientSpaceError) as caught:
        make_downloader(store).fetch(ref(other), url(server, other), protected=(kept,))
    assert caught.value.code == "quota_exceeded"
    assert "quota" in str(caught.value)
    assert server.ranges_for(other) == []


def test_free_space_is_checked_before_downloading(server, store) -> None:
    huge = ArtifactRef(sha256=hashlib.sha256(b"x").hexdigest(), size_bytes=store.free_bytes() + 1, format="gguf")
    with pytest.raises(InsufficientSpaceError) as caught:
        make_downloader(store).fetch(huge, url(server, huge.sha256))
    assert caught.value.code == "insufficient_disk"
    assert server.requests == []


def test_store_prunes_beyond_the_kept_versions(store) -> None:
    shas = []
    for i in range(4):
        data = f"model {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        partial = store.partial_path(sha)
        partial.write_bytes(data)
        store.install(partial, sha)
        os.utime(store.path_for(sha), (1000 + i, 1000 + i))
        shas.append(sha)
    removed = store.prune(protected=(shas[0],))  # an old one that is current stays
    assert set(removed) == {shas[1], shas[2]}
    assert store.has(shas[0]) and store.has(shas[3])


def test_stored_blob_that_no_longer_matches_is_removed(store) -> None:
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    partial = store.partial_path(sha)
    partial.write_bytes(data)
    store.install(partial, sha)
    assert store.verify(sha)
    store.path_for(sha).write_bytes(b"weightz")
    assert not store.verify(sha)
    assert not store.has(sha)
