"""The agent's local API with the official openai client, against a real agent process and real models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from control_plane.modelopt.quantize import quantize_gguf
from slmops.tinymodels import write_tiny_gguf, write_tiny_onnx
from tests.support.agent import AgentProcess, ArtifactServer, desired_for
from tests.support.server_thread import ServerThread

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SECRET_PROMPT = "the-launch-code-is-PLOVER-7731"


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


@pytest.fixture(scope="module")
def models(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    f32 = write_tiny_gguf(folder / "tiny.gguf", seed=0)
    q8 = quantize_gguf(f32, folder / "tiny-q8_0.gguf", "Q8_0").dst
    return {
        "f32": artifacts.add_file(f32),
        "q8_0": artifacts.add_file(q8),
        "onnx": artifacts.add_file(write_tiny_onnx(folder / "tiny.onnx", seed=0)),
    }


@pytest.fixture(scope="module")
def agent(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path_factory.mktemp("api") / "data", control_plane_url=artifacts.url).start()
    yield process
    assert process.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown


def serve(agent: AgentProcess, artifacts: ArtifactServer, sha: str, *, fmt: str = "gguf", name: str = "tiny") -> None:
    quantization = {"gguf": None}.get(fmt)
    desired = desired_for(artifacts, sha, model=name, version=sha[:8], fmt=fmt, quantization=quantization)
    response = agent.apply(desired)
    assert response.status_code == 200, response.text
    assert response.json()["phase"] == "on_trial", response.json()
    assert response.json()["current"]["sha256"] == sha


def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)


def test_readyz_is_503_until_a_model_serves(tmp_path: Path) -> None:
    empty = AgentProcess(tmp_path / "data").start()
    try:
        ready = httpx.get(f"{empty.url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "model_not_loaded"
        assert httpx.get(f"{empty.url}/healthz").status_code == 200
        with pytest.raises(openai.APIStatusError) as caught:
            client(empty).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert client(empty).models.list().data == []
    finally:
        empty.stop()


@pytest.mark.parametrize("variant", ["f32", "q8_0"])
def test_chat_streaming_and_not_with_gguf(agent, artifacts, models, variant) -> None:
    serve(agent, artifacts, models[variant])
    ai = client(agent)
    messages = [{"role": "user", "content": "Say something"}]
    whole = ai.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(
        ai.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # greedy decoding: same text either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    unbounded = ai.chat.completions.create(model="tiny", messages=messages)  # no max_tokens: half of n_ctx=256
    assert 0 < unbounded.usage.completion_tokens <= 128


def test_completions_streaming_and_not(agent, artifacts, models) -> None:
    serve(agent, artifacts, models["f32"])
    ai = client(agent)
    whole = ai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in ai.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, stream=True))  # fmt: skip
    assert streamed == whole.choices[0].text
    stopped = ai.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, stop=[whole.choices[0].text[2:4]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole.choices[0].text[:2]


def test_onnx_model_chat_and_tensor_inference(agent, artifacts, models) -> None:
    serve(agent, artifacts, models["onnx"], fmt="onnx", name="tiny-onnx")
    ai = client(agent)
    assert [m.id for m in ai.models.list().data] == ["tiny-onnx"]
    whole = ai.chat.completions.create(model="tiny-onnx", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in ai.chat.completions.create(
            model="tiny-onnx", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert streamed == whole.choices[0].message.content and len(streamed) > 0
    result = httpx.post(f"{agent.url}/v1/infer", json={"model": "tiny-onnx", "inputs": {"input_ids": [[1, 75, 76]]}})
    assert result.status_code == 200, result.text
    logits = result.json()["outputs"]["logits"]
    assert len(logits) == 1 and len(logits[0]) == 3 and len(logits[0][0]) == 259
    bad = httpx.post(f"{agent.url}/v1/infer", json={"inputs": {"wrong_name": [[1]]}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_inputs"


def test_bad_requests_get_openai_errors_and_the_agent_survives(agent, artifacts, models) -> None:
    serve(agent, artifacts, models["f32"])
    ai = client(agent)
    with pytest.raises(openai.NotFoundError) as unknown:
        ai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        ai.completions.create(model="tiny", prompt="word " * 400, max_tokens=8)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as streaming_too_long:
        list(ai.completions.create(model="tiny", prompt="hi", max_tokens=10_000, stream=True))
    assert streaming_too_long.value.code == "context_length_exceeded"
    raw = httpx.post(
        f"{agent.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{agent.url}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    several = httpx.post(f"{agent.url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2})
    assert several.status_code == 400 and several.json()["error"]["param"] == "n"
    tensors = httpx.post(f"{agent.url}/v1/infer", json={"inputs": {"input_ids": [[1]]}})
    assert tensors.status_code == 400 and tensors.json()["error"]["code"] == "unsupported_operation"
    assert httpx.get(f"{agent.url}/v1/nothing-here").json()["error"]["code"] == "not_found"
    # Still serving after all of that.
    assert ai.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_metrics_and_telemetry_carry_numbers_never_prompts(agent, artifacts, models) -> None:
    serve(agent, artifacts, models["f32"])
    ai = client(agent)
    with agent.admin() as admin:
        admin.post("/v1/admin/telemetry/flush")  # start a clean window
        for _ in range(3):
            ai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=4
            )
        window = admin.post("/v1/admin/telemetry/flush").json()
        following = admin.post("/v1/admin/telemetry/flush").json()
    assert window["requests"] == 3 and window["errors"] == 0 and window["output_tokens"] == 12
    assert window["model"] == "tiny" and window["sha256"] == models["f32"]
    assert 0 < window["latency_s"]["p50"] <= window["latency_s"]["p99"] <= window["latency_s"]["max"]
    assert window["time_to_first_token_s"]["count"] == 3
    assert sum(window["ttft_histogram"]["counts"]) == 3 and window["ttft_histogram"]["bounds"][0] == 0.001
    assert window["system"]["rss_bytes"] > 0 and window["system"]["available_memory_bytes"] > 0
    assert following["seq"] == window["seq"] + 1 and following["requests"] == 0
    metrics = httpx.get(f"{agent.url}/metrics").text
    assert (
        f'slmops_agent_model_info{{format="gguf",model="tiny",quantization="none",sha256="{models["f32"]}"' in metrics
    )
    assert 'slmops_agent_time_to_first_token_seconds_bucket{le="0.001",operation="chat"}' in metrics
    assert 'slmops_agent_time_per_output_token_seconds_bucket{le="0.01",operation="chat"}' in metrics
    assert 'slmops_agent_tokens_total{type="output"}' in metrics
    assert "slmops_agent_process_resident_memory_bytes" in metrics
    assert _sample(metrics, "slmops_agent_download_bytes_total") > 0
    assert SECRET_PROMPT not in json.dumps(window) + metrics + agent.log.read_text()


def test_admin_api_needs_the_admin_token(agent) -> None:
    response = httpx.get(f"{agent.url}/v1/admin/state")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    wrong = httpx.post(f"{agent.url}/v1/admin/rollback", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert (agent.data_dir / "admin.token").stat().st_mode & 0o777 == 0o600


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


BAD_BODIES = [
    ("/v1/chat/completions", []),
    ("/v1/chat/completions", "just a string"),
    ("/v1/chat/completions", {"model": 5, "messages": "hi"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": 7}),
    ("/v1/completions", {"model": "tiny"}),
    ("/v1/infer", {"inputs": "not a dict"}),
]


@pytest.mark.parametrize(("path", "body"), BAD_BODIES)
def test_malformed_requests_get_4xx_in_openai_shape(agent, artifacts, models, path, body) -> None:
    serve(agent, artifacts, models["f32"])
    response = httpx.post(f"{agent.url}{path}", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{agent.url}/healthz").status_code == 200


def test_cors_is_off_by_default(agent) -> None:
    preflight = httpx.options(
        f"{agent.url}/v1/chat/completions",
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def _threads(agent: AgentProcess) -> set[int]:
    assert agent.proc is not None
    return {int(t.name) for t in Path(f"/proc/{agent.proc.pid}/task").iterdir()}


def test_generations_start_no_thread_per_request(agent, artifacts, models) -> None:
    # llama.cpp's OpenMP team belongs to the calling thread: a fresh thread per request paid for a
    # new generating thread and a new team before every first token (docs/performance.md, "lean agent").
    serve(agent, artifacts, models["f32"])
    ai = client(agent)
    seen: list[set[int]] = []
    for stream in (False, True, False, True):
        if stream:
            assert "".join(
                c.choices[0].text for c in ai.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True)
            )
        else:
            assert ai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            ).choices
        seen.append(_threads(agent))
    assert all(threads == seen[0] for threads in seen), [sorted(t ^ seen[0]) for t in seen]
