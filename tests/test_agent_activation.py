"""Activation, trial, rollback and swaps on a real agent process with real tiny models."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.desired import GoldenPrompt, GoldenSet
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
    a = write_tiny_gguf(folder / "a.gguf", seed=1)
    b = write_tiny_gguf(folder / "b.gguf", seed=2)
    return {
        "a": artifacts.add_file(a),
        "b": artifacts.add_file(b),
        # Right sha256 for its bytes, but not a model: downloads and verifies, then fails to load.
        "garbage": artifacts.add(b"GGUF" + random.Random(3).randbytes(200_000)),
        "corrupt": artifacts.add(b.read_bytes()[:-1] + b"!", Misbehaviour(corrupt=True)),
    }


@pytest.fixture
def agent(artifacts: ArtifactServer, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, trial_requests=1000).start()
    yield process
    process.stop()


def apply(agent: AgentProcess, artifacts: ArtifactServer, sha: str, version: str, **kw) -> dict:
    response = agent.apply(desired_for(artifacts, sha, version=version, **kw))
    assert response.status_code == 200, response.text
    return response.json()


def generate(agent: AgentProcess) -> str:
    ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
    return ai.completions.create(model="tiny", prompt="hello", max_tokens=4).choices[0].text


def test_corrupted_artifact_is_refused_while_the_old_model_serves(agent, artifacts, models) -> None:
    apply(agent, artifacts, models["a"], "1")
    before = generate(agent)
    state = apply(agent, artifacts, models["corrupt"], "2")
    assert state["phase"] == "download_failed"
    assert state["reason"].startswith("integrity_check_failed")
    assert state["current"]["sha256"] == models["a"] and state["pending"] is None
    assert generate(agent) == before
    assert not (agent.data_dir / "store" / "sha256" / models["corrupt"]).exists()


def test_model_that_fails_to_load_leaves_the_old_one_serving(agent, artifacts, models) -> None:
    apply(agent, artifacts, models["a"], "1")
    state = apply(agent, artifacts, models["garbage"], "2")
    assert state["phase"] == "activation_failed"
    assert state["reason"].startswith("load_failed")
    assert state["current"]["version"] == "1"
    assert generate(agent)
    assert httpx.get(f"{agent.url}/readyz").json()["version"] == "1"


def test_rollback_returns_to_the_previous_model(agent, artifacts, models) -> None:
    apply(agent, artifacts, models["a"], "1")
    text_a = generate(agent)
    state = apply(agent, artifacts, models["b"], "2")
    assert state["previous"]["version"] == "1" and state["current"]["version"] == "2"
    assert generate(agent) != text_a  # a different model answers
    with agent.admin() as admin:
        rolled = admin.post("/v1/admin/rollback").json()
    assert rolled["phase"] == "rolled_back" and rolled["current"]["version"] == "1"
    assert generate(agent) == text_a
    # The fleet then asks for what the device already serves: nothing to load, and it is settled.
    settled = apply(agent, artifacts, models["a"], "1")
    assert settled["phase"] == "committed" and settled["current"]["sha256"] == models["a"]
    assert 'slmops_agent_model_swaps_total{outcome="activated"} 2.0' in httpx.get(f"{agent.url}/metrics").text


def test_duplicate_desired_message_is_applied_once(agent, artifacts, models) -> None:
    desired = desired_for(artifacts, models["a"], version="1", message_id="msg-1")
    assert agent.apply(desired).json()["phase"] == "on_trial"
    with agent.admin() as admin:
        refused = admin.post("/v1/admin/rollback")  # nothing to roll back to
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "rollback_unavailable"
    again = agent.apply(desired).json()  # a QoS 1 redelivery of the same message
    assert again["phase"] == "on_trial" and again["desired_message_id"] == "msg-1"
    metrics = httpx.get(f"{agent.url}/metrics").text
    assert 'slmops_agent_model_swaps_total{outcome="activated"} 1.0' in metrics


def test_trial_commits_after_enough_healthy_requests(artifacts, models, tmp_path) -> None:
    process = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, trial_requests=3).start()
    try:
        assert apply(process, artifacts, models["a"], "1")["phase"] == "on_trial"
        for _ in range(3):
            generate(process)
        wait_for(lambda: process.state()["phase"] == "committed", what="commit after 3 requests", timeout_s=30)
    finally:
        process.stop()


def test_quota_exceeded_is_refused_with_a_clear_reason(artifacts, models, tmp_path) -> None:
    # One tiny model (~5.5 MB) fits in 8 MB; a second one next to it (kept for rollback) would not.
    process = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, disk_quota_mb=8).start()
    try:
        assert apply(process, artifacts, models["a"], "1")["phase"] == "on_trial"
        seen = len(artifacts.requests)
        state = apply(process, artifacts, models["b"], "2")
        assert state["phase"] == "download_failed"
        assert state["reason"].startswith("quota_exceeded") and "quota" in state["reason"]
        assert state["current"]["version"] == "1"
        assert not [r for r in artifacts.requests[seen:] if r["sha"] == models["b"]]  # refused before fetching
        assert generate(process)
    finally:
        process.stop()


def test_swap_without_memory_for_two_unloads_first_and_recovers_from_a_bad_model(artifacts, models, tmp_path) -> None:
    process = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, memory_budget_mb=100).start()
    try:
        apply(process, artifacts, models["a"], "1")
        swapped = apply(process, artifacts, models["b"], "2")
        assert swapped["current"]["version"] == "2"
        assert "not enough memory for both" in swapped["reason"] and "unavailability" in swapped["reason"]
        with process.admin() as admin:
            assert admin.get("/v1/admin/state").json()["swap_mode"] == "unload_first"
        state = apply(process, artifacts, models["garbage"], "3")
        assert state["phase"] == "activation_failed" and state["current"]["version"] == "2"
        assert generate(process)  # the old model was reloaded
    finally:
        process.stop()


def test_twenty_swaps_under_concurrent_load_fail_no_request(agent, artifacts, models) -> None:
    apply(agent, artifacts, models["a"], "0")
    stop = threading.Event()
    failures: list[str] = []
    served: list[int] = []

    def load(stream: bool) -> None:
        ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
        while not stop.is_set():
            try:
                if stream:
                    chunks = list(ai.completions.create(model="tiny", prompt="hi", max_tokens=6, stream=True))
                    assert chunks[-1].choices[0].finish_reason == "length"
                else:
                    assert (
                        ai.chat.completions.create(
                            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6
                        ).usage.completion_tokens
                        == 6
                    )
                served.append(1)
            except Exception as exc:  # every failure is counted, none hidden
                failures.append(repr(exc))

    workers = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
    for worker in workers:
        worker.start()
    try:
        for i in range(1, 21):
            state = apply(agent, artifacts, models["b" if i % 2 else "a"], str(i))
            assert state["phase"] == "on_trial" and state["current"]["version"] == str(i)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert failures == []
    assert len(served) > 20
    metrics = httpx.get(f"{agent.url}/metrics").text
    assert 'slmops_agent_model_swaps_total{outcome="activated"} 21.0' in metrics


def test_a_newer_desired_state_supersedes_a_long_download(agent, artifacts, models) -> None:
    apply(agent, artifacts, models["a"], "1")
    slow = artifacts.add(random.Random(9).randbytes(3_000_000), Misbehaviour(bytes_per_s=200_000))
    agent.apply(desired_for(artifacts, slow, version="slow"), wait=False)
    partial = agent.data_dir / "downloads" / f"{slow}.part"
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="the slow download to start")
    state = apply(agent, artifacts, models["b"], "2")  # would wait ~15 s behind the slow download otherwise
    assert state["current"]["version"] == "2" and state["phase"] == "on_trial"
    assert len(artifacts.ranges_for(slow)) == 1  # stopped, not retried
    assert not (agent.data_dir / "store" / "sha256" / slow).exists()


def test_the_same_message_retries_a_failed_download(agent, artifacts, models) -> None:
    data = random.Random(10).randbytes(100_000)
    desired = desired_for(artifacts, artifacts.add(data), version="late", message_id="late-1")
    sha = desired.artifact.sha256
    missing = artifacts.files.pop(sha)  # not on the server yet
    first = agent.apply(desired).json()
    assert first["phase"] == "download_failed" and first["reason"].startswith("http_404")
    artifacts.files[sha] = missing
    retried = agent.apply(desired).json()  # e.g. the retained message delivered again after a reconnect
    assert retried["phase"] == "activation_failed" and retried["reason"].startswith("load_failed")
    assert (agent.data_dir / "store" / "sha256" / sha).exists()  # downloaded and verified this time


def test_the_golden_set_is_answered_during_the_trial_and_reported_with_the_state(agent, artifacts, models) -> None:
    prompts = [GoldenPrompt(id=f"p{i}", prompt=f"Say {word}.", accept=[word]) for i, word in enumerate(("zyx", "qwv"))]
    desired = desired_for(artifacts, models["a"], version="1").model_copy(update={"golden": GoldenSet(prompts=prompts)})
    state = agent.apply(desired).json()
    assert state["phase"] == "on_trial", state
    # The random-weight model answers neither; the run happened on the device and is reported.
    golden = {k: v for k, v in state["golden"].items() if k != "schema_version"}
    assert golden == {"version": "1", "passed": 0, "total": 2, "failed": ["p0", "p1"], "error": None}
    assert generate(agent)  # the model serves on: the gate, not the device, judges the rate
