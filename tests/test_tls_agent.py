"""The agent keeps its credential off plaintext networks and trusts the CA bundle it is given."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.errors import DownloadError, EnrollmentError
from edge_agent.settings import ConfigError, load_settings
from edge_agent.tls import plaintext_problem
from shared.desired import ArtifactRef
from tests.support.agent import ArtifactServer
from tests.support.server_thread import ServerThread
from tests.support.tls import TestCA

PAYLOAD = random.Random(22).randbytes(300_000)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8080", "http://cp.example.com/", "http://[fd00::1]:8080", "mqtt://192.168.1.2:1883"]
)
def test_plaintext_url_off_loopback_is_refused(url: str, tmp_path: Path) -> None:
    assert plaintext_problem(url) is not None
    field = "mqtt_url" if url.startswith("mqtt") else "control_plane_url"
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        load_settings(data_dir=tmp_path, **{field: url})
    assert getattr(load_settings(data_dir=tmp_path, allow_insecure_http=True, **{field: url}), field) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://localhost:8080",
        "http://[::1]:8080",
        "https://cp.example.com",
        "mqtt://127.0.0.1:1883",
        "mqtts://broker.example.com",
    ],
)
def test_loopback_or_tls_urls_are_accepted(url: str) -> None:
    assert plaintext_problem(url) is None


@pytest.fixture
def https_control_plane(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca = TestCA(tmp_path / "ca")
    cert = ca.issue("control-plane")
    server = ArtifactServer(enrollment_tokens={"token-0001": "edge-1"})
    with ServerThread(server.app(), tls=(str(cert.cert_file), str(cert.key_file))) as thread:
        yield ca, server, thread.url


def _agent(tmp_path: Path, url: str, **settings: object) -> Agent:
    return Agent(load_settings(data_dir=tmp_path / "data", control_plane_url=url, **settings))


def test_agent_enrolls_and_downloads_over_https_with_its_ca_bundle(tmp_path, https_control_plane) -> None:  # type: ignore[no-untyped-def]
    ca, server, url = https_control_plane
    sha = server.add(PAYLOAD)
    agent = _agent(tmp_path, url, enrollment_token="token-0001", ca_bundle=str(ca.ca_file))
    try:
        agent.enroll()
        assert agent.credential is not None and agent.credential.device_id == "edge-1"
        ref = ArtifactRef(sha256=sha, size_bytes=len(PAYLOAD), format="gguf")
        artifact_url, own = agent.artifact_url(ref)
        assert own and artifact_url.startswith("https://")
        assert agent.fetch(ref, artifact_url, with_auth=own).read_bytes() == PAYLOAD
        assert server.requests[-1]["auth"].startswith("Basic ")  # the credential went over TLS only
    finally:
        agent.stop()


def test_agent_refuses_a_certificate_its_bundle_does_not_sign(tmp_path, https_control_plane, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _ca, server, url = https_control_plane
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    other = TestCA(tmp_path / "other", name="someone else's CA")
    agent = _agent(tmp_path, url, enrollment_token="token-0001", ca_bundle=str(other.ca_file))
    try:
        with pytest.raises(EnrollmentError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            agent.enroll()
        assert refused.value.code == "unreachable"
        assert "token-0001" in server.enrollment_tokens  # the token never reached the server
    finally:
        agent.stop()


def test_download_from_an_untrusted_server_is_refused(tmp_path, https_control_plane, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _ca, server, url = https_control_plane
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    sha = server.add(PAYLOAD)
    agent = _agent(tmp_path, url, download_retries=0)  # the system store: the test CA is not in it
    try:
        ref = ArtifactRef(sha256=sha, size_bytes=len(PAYLOAD), format="gguf")
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            agent.fetch(ref, f"{url}/v1/artifacts/{sha}", with_auth=True)
        assert server.requests == []
    finally:
        agent.stop()


def test_missing_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_bundle"):
        load_settings(data_dir=tmp_path, ca_bundle=str(tmp_path / "absent.pem"))


def test_plaintext_broker_url_from_enrollment_is_refused(tmp_path: Path) -> None:
    from edge_agent.enroll import Credential
    from edge_agent.mqtt.channel import MqttChannel

    settings = load_settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    credential = Credential(device_id="edge-1", device_secret="s" * 16, mqtt_url="mqtt://10.0.0.9:1883")
    settings.credential_path.write_text(credential.model_dump_json())
    agent = Agent(settings)
    agent.enroll()
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttChannel.for_agent(agent)
