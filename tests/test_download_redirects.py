"""Redirects the agent's downloader follows, against real HTTP and HTTPS servers that answer 302.

The client is built as the agent builds its own (`follow_redirects=True`): the downloader must
judge every hop itself rather than rely on how it was handed the client.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from edge_agent.download import Downloader
from edge_agent.errors import DownloadError
from edge_agent.store import ModelStore
from shared.desired import ArtifactRef
from tests.support.agent import ArtifactServer
from tests.support.server_thread import ServerThread
from tests.support.tls import self_signed

PAYLOAD = random.Random(11).randbytes(200_000)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed(tmp_path_factory.mktemp("tls"))


class Redirector:
    """Answers every GET with 302 to `location(path)` and counts what it was asked."""

    def __init__(self, location: Callable[[str], str]) -> None:
        self.location = location
        self.hits: list[str] = []

    async def _redirect(self, request: Request) -> Response:
        self.hits.append(request.url.path)
        return RedirectResponse(self.location(request.url.path), status_code=302)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._redirect, methods=["GET"])])


@pytest.fixture
def servers(tls_files: tuple[str, str]) -> Iterator[Callable[..., tuple[ServerThread, object]]]:
    with ExitStack() as stack:

        def start(thing: ArtifactServer | Redirector, *, tls: bool = False) -> ServerThread:
            thread = stack.enter_context(ServerThread(thing.app(), tls=tls_files if tls else None))
            if isinstance(thing, ArtifactServer):
                thing.port = thread.port
            return thread

        yield start  # type: ignore[misc]


def _downloader(store: ModelStore, tls_files: tuple[str, str], **options: object) -> Downloader:
    trust = ssl.create_default_context(cafile=tls_files[0])
    client = httpx.Client(timeout=10, follow_redirects=True, verify=trust)  # as edge_agent.agent builds it
    return Downloader(store, client=client, retries=1, backoff_s=0, sleep=lambda s: None, **options)  # type: ignore[arg-type]


def _ref(sha: str) -> ArtifactRef:
    return ArtifactRef(sha256=sha, size_bytes=len(PAYLOAD), format="gguf")


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data", keep_versions=2)


def test_https_reference_redirected_to_plain_http_is_refused(servers, store, tls_files) -> None:  # type: ignore[no-untyped-def]
    plain = ArtifactServer()
    sha = plain.add(PAYLOAD)
    plain_thread = servers(plain)
    cdn = servers(Redirector(lambda path: f"{plain_thread.url}/v1/artifacts/{sha}"), tls=True)

    with pytest.raises(DownloadError) as refused:
        _downloader(store, tls_files).fetch(_ref(sha), f"{cdn.url}/models/a.gguf", with_auth=False)
    assert refused.value.code == "redirect_refused"
    assert "downgrade" in str(refused.value)
    assert plain.requests == []  # the plain-http server was never asked
    assert not store.has(sha) and store.partial_path(sha).stat().st_size == 0


def test_redirect_to_another_host_over_plain_http_is_refused(servers, store, tls_files) -> None:  # type: ignore[no-untyped-def]
    elsewhere = ArtifactServer()
    sha = elsewhere.add(PAYLOAD)
    other = servers(elsewhere)
    control_plane = servers(Redirector(lambda path: f"http://localhost:{other.port}/v1/artifacts/{sha}"))

    with pytest.raises(DownloadError) as refused:
        _downloader(store, tls_files).fetch(_ref(sha), f"{control_plane.url}/v1/artifacts/{sha}")
    assert refused.value.code == "redirect_refused"
    assert elsewhere.requests == [] and not store.has(sha)


def test_redirect_into_a_private_network_needs_the_allow_list(servers, store, tls_files) -> None:  # type: ignore[no-untyped-def]
    mirror = ArtifactServer()
    sha = mirror.add(PAYLOAD)
    mirror_thread = servers(mirror, tls=True)
    cdn = servers(Redirector(lambda path: f"{mirror_thread.url}/v1/artifacts/{sha}"), tls=True)
    device = httpx.BasicAuth("device-1", "device-secret")

    with pytest.raises(DownloadError) as refused:
        _downloader(store, tls_files, auth=device).fetch(_ref(sha), f"{cdn.url}/a.gguf")
    assert refused.value.code == "redirect_refused" and "loopback" in str(refused.value)
    assert mirror.requests == []

    allowed = _downloader(store, tls_files, auth=device, redirect_allowed_hosts=("127.0.0.0/8",))
    assert allowed.fetch(_ref(sha), f"{cdn.url}/a.gguf").read_bytes() == PAYLOAD
    assert [r["auth"] for r in mirror.requests] == [None]  # the device credential stayed with the first host


def test_same_origin_redirect_is_followed_with_the_credential(servers, store, tls_files) -> None:  # type: ignore[no-untyped-def]
    artifacts = ArtifactServer(credentials={"device-1": "device-secret"})
    sha = artifacts.add(PAYLOAD)
    moved = Redirector(lambda path: f"/v1/artifacts/{path.rsplit('/', 1)[-1]}")
    app = artifacts.app()
    app.router.routes.insert(0, Route("/moved/{sha}", moved._redirect, methods=["GET"]))
    with ServerThread(app) as thread:
        downloader = _downloader(store, tls_files, auth=httpx.BasicAuth("device-1", "device-secret"))
        path = downloader.fetch(_ref(sha), f"{thread.url}/moved/{sha}")
    assert path.read_bytes() == PAYLOAD
    assert moved.hits == [f"/moved/{sha}"] and artifacts.requests[-1]["auth"] is not None


def test_a_redirect_loop_ends_with_an_error(servers, store, tls_files) -> None:  # type: ignore[no-untyped-def]
    loop = Redirector(lambda path: path)
    thread = servers(loop)
    with pytest.raises(DownloadError) as refused:
        _downloader(store, tls_files).fetch(_ref("ab" * 32), f"{thread.url}/loop")
    assert refused.value.code == "too_many_redirects"
    assert len(loop.hits) == 6  # the request and five redirects


def test_the_agent_holds_artifact_urls_elsewhere_to_the_reference_rules(tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.settings import load_settings

    base = "http://127.0.0.1:8080"
    agent = Agent(load_settings(None, data_dir=tmp_path / "data", control_plane_url=base))
    sha = "ab" * 32

    def url_for(url: str | None) -> tuple[str, bool]:
        return agent.artifact_url(ArtifactRef(sha256=sha, size_bytes=1, format="gguf", url=url))

    assert url_for(None) == (f"{base}/v1/artifacts/{sha}", True)
    assert url_for(f"{base}/v1/artifacts/{sha}") == (f"{base}/v1/artifacts/{sha}", True)  # its control plane
    assert url_for("https://cdn.example/m.gguf") == ("https://cdn.example/m.gguf", False)  # no credential
    for url in ("s3://models/m.gguf", "https://169.254.169.254/m", "https://u:p@cdn.example/m", "http://cdn.example/m"):
        with pytest.raises(DownloadError) as refused:
            url_for(url)
        assert refused.value.code == "reference_refused", url
        assert "u:p@" not in str(refused.value)
    mirror = Agent(
        load_settings(None, data_dir=tmp_path / "m", control_plane_url=base, download_allowed_hosts=["10.0.0.0/8"])
    )
    assert (
        mirror.artifact_url(ArtifactRef(sha256=sha, size_bytes=1, format="gguf", url="https://10.2.3.4/m"))[1] is False
    )
