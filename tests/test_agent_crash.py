"""kill -9 at the crash-relevant steps: the restarted agent serves exactly one verified model."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from slmops.tinymodels import write_tiny_gguf
from tests.support.agent import AgentProcess, ArtifactServer, Misbehaviour, desired_for
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.llama, pytest.mark.slow]


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


@pytest.fixture(scope="module")
def models(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "a": artifacts.add_file(write_tiny_gguf(folder / "a.gguf", seed=11)),
        "b": artifacts.add_file(write_tiny_gguf(folder / "b.gguf", seed=12)),
    }


def assert_serves_exactly_one_verified_model(agent: AgentProcess, allowed: set[str]) -> str:
    agent.wait_ready()
    wait_for(lambda: agent.state()["phase"] not in ("downloading", "activating"), what="reconcile to settle")
    state = agent.state()
    listed = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused").models.list().data
    assert len(listed) == 1
    sha = state["current"]["sha256"]
    assert listed[0].sha256 == sha and sha in allowed
    blob = agent.data_dir / "store" / "sha256" / sha
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
    assert ai.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    assert not list((agent.data_dir / "downloads").glob("*.part"))
    assert not list(agent.data_dir.glob(".*.tmp"))
    return sha


def test_kill9_mid_download_resumes_with_range_and_verifies(artifacts, models, tmp_path) -> None:
    sha = models["b"]
    artifacts.behaviour[sha] = Misbehaviour(bytes_per_s=1_500_000)
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url).start()
    partial = agent.data_dir / "downloads" / f"{sha}.part"
    agent.apply(desired_for(artifacts, sha, version="2"), wait=False)
    wait_for(lambda: partial.exists() and partial.stat().st_size > 1_000_000, what="download under way")
    agent.kill9()
    total = len(artifacts.files[sha])
    kept = partial.stat().st_size
    assert 0 < kept < total
    assert agent.state_file_phase() == "downloading"
    artifacts.behaviour.pop(sha)
    agent.start()
    try:
        assert assert_serves_exactly_one_verified_model(agent, {sha}) == sha
        ranges = artifacts.ranges_for(sha)
        assert ranges[0] is None and len(ranges) == 2
        resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
        assert kept <= resumed_at < total
    finally:
        agent.stop()


@pytest.mark.parametrize("point", ["activation_started", "activation_loaded", "trial_started"])
def test_kill9_during_activation_leaves_exactly_one_verified_model(artifacts, models, tmp_path, point) -> None:
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url).start()
    agent.apply(desired_for(artifacts, models["a"], version="1"))
    agent.stop()
    agent.start(env_extra={"SLMOPS_AGENT_FAILPOINTS": f"{point}=60"})
    agent.wait_ready()
    agent.apply(desired_for(artifacts, models["b"], version="2"), wait=False)
    wait_for(lambda: f"failpoint {point}" in agent.log.read_text(), what=f"agent paused at {point}")
    agent.kill9()
    agent.start()
    try:
        # Whichever side of the switch the kill landed on, the unfinished work is finished: B serves.
        assert assert_serves_exactly_one_verified_model(agent, {models["a"], models["b"]}) == models["b"]
        assert agent.state()["previous"]["sha256"] == models["a"]
    finally:
        agent.stop()


def test_repeated_crashes_while_activating_give_up_and_keep_the_old_model(artifacts, models, tmp_path) -> None:
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, max_activation_attempts=2).start()
    agent.apply(desired_for(artifacts, models["a"], version="1"))
    agent.stop()
    crash = {"SLMOPS_AGENT_FAILPOINTS": "activation_started=60"}
    agent.start(env_extra=crash)
    agent.apply(desired_for(artifacts, models["b"], version="2"), wait=False)
    for attempt in (1, 2):
        pauses = lambda n=attempt: agent.log.read_text().count("failpoint activation_started") >= n  # noqa: E731
        wait_for(pauses, what=f"pause number {attempt}")
        agent.kill9()
        agent.start(env_extra=crash)  # the restart retries the activation, and crashes again
    try:
        assert assert_serves_exactly_one_verified_model(agent, {models["a"]}) == models["a"]
        state = agent.state()
        assert state["phase"] == "activation_failed" and "stopped 2 times" in state["reason"]
        assert httpx.get(f"{agent.url}/readyz").json()["version"] == "1"
    finally:
        agent.stop()
