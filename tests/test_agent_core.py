"""The Agent class in-process: the surface the MQTT channel uses (submit_desired, subscribe), trial, LoRA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent, AgentEvent
from edge_agent.download import Progress
from edge_agent.settings import load_settings
from edge_agent.telemetry import RequestRecord
from shared.desired import DesiredState
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow
from slmops.tinymodels import write_tiny_gguf, write_tiny_lora_gguf
from tests.support.agent import ArtifactServer, desired_for
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.llama]


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


@pytest.fixture(scope="module")
def models(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    base = write_tiny_gguf(folder / "base.gguf", seed=31)
    return {
        "a": artifacts.add_file(base),
        "b": artifacts.add_file(write_tiny_gguf(folder / "b.gguf", seed=32)),
        "lora": artifacts.add_file(write_tiny_lora_gguf(base, folder / "lora.gguf", seed=33)),
    }


@pytest.fixture
def agent(artifacts: ArtifactServer, tmp_path: Path) -> Iterator[Agent]:
    settings = load_settings(
        None, data_dir=tmp_path / "data", control_plane_url=artifacts.url, trial_requests=50, trial_max_errors=2
    )
    instance = Agent(settings)
    instance.start()
    wait_for(instance.started.is_set, what="agent start-up")
    yield instance
    instance.stop()


def submit(agent: Agent, desired: DesiredState) -> DeviceState:
    agent.submit_desired(desired).result(timeout=60)
    return agent.device_state()


def test_observers_see_state_changes_progress_and_telemetry(agent, artifacts, models) -> None:
    events: list[AgentEvent] = []
    agent.subscribe(events.append)
    agent.subscribe(lambda event: 1 / 0)  # a failing publisher must not disturb the agent
    state = submit(agent, desired_for(artifacts, models["a"], version="1", message_id="m-1"))
    assert state.phase == "on_trial" and state.desired_message_id == "m-1"
    phases = [e.payload.phase for e in events if isinstance(e.payload, DeviceState)]
    assert phases[:3] == ["downloading", "activating", "on_trial"]
    progress = [e.payload for e in events if isinstance(e.payload, Progress)]
    assert progress and progress[-1].bytes_done == progress[-1].bytes_total
    window = agent.emit_telemetry()
    assert isinstance(events[-1].payload, TelemetryWindow) and events[-1].payload.seq == window.seq
    assert window.version == "1" and window.sha256 == models["a"]


def test_trial_errors_roll_back_to_the_previous_model(agent, artifacts, models) -> None:
    submit(agent, desired_for(artifacts, models["a"], version="1"))
    submit(agent, desired_for(artifacts, models["b"], version="2"))
    serving = agent.slot.current
    assert serving is not None and serving.spec.version == "2"
    for _ in range(2):  # what the API records when the engine fails a request (HTTP 500)
        agent.record_request("chat", serving, RequestRecord(0.1, error_type="generation_failed"))
    wait_for(lambda: agent.device_state().phase == "rolled_back", what="automatic rollback")
    state = agent.device_state()
    assert state.current is not None and state.current.version == "1"
    assert state.reason is not None and state.reason.startswith("trial failed: 2 errors")
    assert agent.slot.current is not None and agent.slot.current.spec.version == "1"


def test_lora_adapter_is_downloaded_and_applied(agent, artifacts, models) -> None:
    plain = desired_for(artifacts, models["a"], version="1")
    submit(agent, plain)
    without = _generate(agent)
    adapter = {"sha256": models["lora"], "size_bytes": len(artifacts.files[models["lora"]]), "format": "gguf-lora"}
    with_lora = DesiredState.model_validate({**plain.model_dump(), "message_id": "lora-1", "version": "1+lora",
                                             "adapter": adapter})  # fmt: skip
    state = submit(agent, with_lora)
    assert state.phase == "on_trial", state.reason
    assert (agent.settings.data_dir / "store" / "sha256" / models["lora"]).is_file()
    assert _generate(agent) != without


def _generate(agent: Agent) -> str:
    with agent.slot.lease() as model:
        return "".join(chunk.text for chunk in model.engine.complete("Once upon", max_tokens=12))


def test_a_swap_closes_the_telemetry_window_so_versions_never_mix(agent, artifacts, models) -> None:
    windows: list[TelemetryWindow] = []
    agent.subscribe(lambda e: windows.append(e.payload) if isinstance(e.payload, TelemetryWindow) else None)
    submit(agent, desired_for(artifacts, models["a"], version="1"))
    agent.emit_telemetry()
    for version, sha, count in (("1", models["a"], 3), ("2", models["b"], 2)):
        if version == "2":
            submit(agent, desired_for(artifacts, sha, version="2"))
        serving = agent.slot.current
        assert serving is not None and serving.spec.version == version
        for _ in range(count):
            agent.record_request("chat", serving, RequestRecord(0.05, 0.01, 3, 4))
    agent.emit_telemetry()
    wait_for(lambda: len(windows) >= 3, what="the window cut by the swap and the flushed one")
    by_version = {w.version: w.requests for w in windows[1:]}
    assert by_version == {"1": 3, "2": 2}
    assert len({w.seq for w in windows}) == len(windows)


def test_an_unload_stops_serving_and_a_restart_serves_nothing(agent, artifacts, models) -> None:
    """A rollback that withdraws a device's first model: the agent serves nothing, reports so,
    keeps serving nothing after a restart, and goes forward again without a download."""
    first = desired_for(artifacts, models["a"], version="1", message_id="serve-1")
    submit(agent, first)
    assert agent.slot.current is not None
    withdraw = first.model_copy(update={"message_id": "unload-1", "unload": True, "rollout_id": None})
    state = submit(agent, withdraw)
    assert state.current is None and state.phase == "idle" and state.desired_message_id == "unload-1"
    assert state.previous is not None and state.previous.version == "1"
    assert state.reason == withdraw.withdrawal_reason()  # the words the simulated agents use too
    assert agent.slot.current is None
    assert submit(agent, withdraw).desired_message_id == "unload-1"  # a redelivery changes nothing

    agent.stop()
    again = Agent(agent.settings)
    again.start()
    try:
        wait_for(again.started.is_set, what="agent restart")
        assert again.slot.current is None and again.device_state().current is None
        requests_before = len(artifacts.ranges_for(models["a"]))
        state = submit(again, first.model_copy(update={"message_id": "serve-2"}))
        assert state.phase == "on_trial" and state.current is not None and state.current.version == "1"
        assert len(artifacts.ranges_for(models["a"])) == requests_before  # its file was kept
    finally:
        again.stop()
