"""The device API as the official openai client sees it, on a real pretrained model (SmolLM2-135M-Instruct).

Counts are checked against llama-cpp-python itself, run in this process on the same file: the
templated prompt tokenized, and greedy generation counted token by token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.agent import AgentProcess, ArtifactServer, artifact_server, desired_for
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.llama, pytest.mark.slow]

llama_cpp = pytest.importorskip("llama_cpp")

N_CTX = 512
MAX_BODY = 64 * 1024
ORIGIN = "http://dashboard.example"
EMOJI_PROMPT = "🌊🐟🐠🐬🌊🐟🐠🐬🌊🐟"
JAPANESE_PROMPT = "東京は日本の首都です。東京は"


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    with artifact_server() as server:
        yield server


@pytest.fixture(scope="module")
def smol_sha(artifacts: ArtifactServer, smollm2_path: Path) -> str:
    return artifacts.add_file(smollm2_path)


@pytest.fixture(scope="module")
def agent(artifacts: ArtifactServer, smol_sha: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(
        tmp_path_factory.mktemp("fidelity") / "data",
        control_plane_url=artifacts.url,
        threads=2,
        trial_requests=4,
        trial_seconds=3600,
        max_request_bytes=MAX_BODY,
        max_queued_requests=1,
        cors_allow_origins=[ORIGIN],
    ).start()
    response = process.apply(desired_for(artifacts, smol_sha, model="smol", version="1", n_ctx=N_CTX))
    assert response.status_code == 200 and response.json()["phase"] == "on_trial", response.text
    yield process
    assert process.stop() in (0, -15)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=N_CTX, n_threads=2, verbose=False)


def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0, timeout=300)


def templated(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """llama-cpp-python's own rendering of the model's chat template, tokenized as llama.cpp does."""
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    prompt = formatter(messages=messages).prompt
    return llm.tokenize(prompt.encode(), add_bos=False, special=True)  # type: ignore[no-any-return]


def greedy(llm: Any, prompt_tokens: list[int], max_tokens: int, stop: str | None = None) -> tuple[str, int]:
    """The text and the number of tokens llama.cpp generates greedily (the end-of-generation token not
    counted), up to `max_tokens` or until the text contains `stop` (cut there)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    generated: list[int] = []
    for token in llm.generate(prompt_tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(generated) == max_tokens:
            break
        generated.append(token)
        if stop and stop in llm.detokenize(generated, prev_tokens=prompt_tokens).decode("utf-8", errors="ignore"):
            break
    text = llm.detokenize(generated, prev_tokens=prompt_tokens).decode("utf-8", errors="replace")
    return (text.split(stop)[0] if stop else text), len(generated)


def test_chat_usage_is_llama_cpp_count_with_the_template(agent, reference) -> None:
    ai = client(agent)
    messages = [{"role": "user", "content": "Reply with three sea emoji: 🌊🐟🐠"}]
    expected_text, expected_completion = greedy(reference, templated(reference, messages), 10)
    whole = ai.chat.completions.create(model="smol", messages=messages, max_tokens=10)
    assert whole.usage.prompt_tokens == len(templated(reference, messages))
    assert whole.usage.completion_tokens == expected_completion
    assert whole.choices[0].message.content == expected_text
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = ai.chat.completions.create(
        model="smol", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text
    last = chunks[-1].usage
    assert (last.prompt_tokens, last.completion_tokens) == (whole.usage.prompt_tokens, expected_completion)
    assert whole.system_fingerprint and "smol" in whole.system_fingerprint


@pytest.mark.parametrize("prompt", [EMOJI_PROMPT, JAPANESE_PROMPT], ids=["emoji", "japanese"])
def test_completion_usage_counts_tokens_not_chunks(agent, reference, prompt) -> None:
    ai = client(agent)
    prompt_tokens = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    expected_text, expected_completion = greedy(reference, prompt_tokens, 8)
    whole = ai.completions.create(model="smol", prompt=prompt, max_tokens=8)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_tokens), expected_completion)
    assert whole.choices[0].text == expected_text
    chunks = list(
        ai.completions.create(
            model="smol", prompt=prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
    assert chunks[-1].usage.completion_tokens == expected_completion
    # More tokens than text pieces: multi-byte characters span several tokens.
    assert expected_completion > len([c for c in chunks if c.choices and c.choices[0].text])


def test_stop_sequence_keeps_the_generated_count(agent, reference) -> None:
    ai = client(agent)
    prompt_tokens = reference.tokenize(JAPANESE_PROMPT.encode(), add_bos=False, special=True)
    stop = greedy(reference, prompt_tokens, 8)[0][2]
    expected_text, expected_completion = greedy(reference, prompt_tokens, 8, stop=stop)
    stopped = ai.completions.create(model="smol", prompt=JAPANESE_PROMPT, max_tokens=8, stop=[stop])
    assert stopped.choices[0].text == expected_text and stopped.choices[0].finish_reason == "stop"
    # Every token up to the one that completed the stop string was generated, and is counted.
    assert stopped.usage.completion_tokens == expected_completion


def test_sampling_varies_without_a_seed_and_repeats_with_one(agent) -> None:
    ai = client(agent)
    args: dict[str, Any] = {"model": "smol", "prompt": "My favourite animal is the", "max_tokens": 6}
    unseeded = {ai.completions.create(temperature=1.0, **args).choices[0].text for _ in range(4)}
    assert len(unseeded) > 1
    seeded = [ai.completions.create(temperature=1.0, seed=7, **args).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    streamed = "".join(
        c.choices[0].text for c in ai.completions.create(temperature=1.0, seed=7, stream=True, **args) if c.choices
    )
    assert streamed == seeded[0]
    greedy_text = ai.completions.create(temperature=0.0, **args).choices[0].text
    # top_k=1 (llama-server's extension) leaves one candidate: sampling at any temperature is greedy.
    narrowed = ai.completions.create(temperature=1.5, extra_body={"top_k": 1}, **args).choices[0].text
    assert narrowed == greedy_text


def test_penalties_are_applied(agent) -> None:
    ai = client(agent)
    args: dict[str, Any] = {"model": "smol", "prompt": EMOJI_PROMPT, "max_tokens": 8, "temperature": 0.0}
    plain = ai.completions.create(**args).choices[0].text
    assert ai.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **args).choices[0].text != plain


def test_json_schema_output_parses_and_matches(agent) -> None:
    ai = client(agent)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "sunny": {"type": "boolean"},
        },
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    reply = ai.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Give the weather in Paris as JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"city", "sunny"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 12 and isinstance(value["sunny"], bool)
    anything = ai.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.lstrip().startswith("{")


def test_logprobs_come_from_the_engine(agent) -> None:
    ai = client(agent)
    chat = ai.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 3 for item in content)
    assert all(item.top_logprobs[0].logprob >= item.logprob - 1e-4 for item in content)  # greedy: the best
    text = ai.completions.create(model="smol", prompt="The sky is", max_tokens=3, logprobs=2)
    assert len(text.choices[0].logprobs.token_logprobs) == text.usage.completion_tokens
    assert all(len(top) == 2 for top in text.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"made_up_option": True}, "made_up_option"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(agent, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(agent).chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
        )
    assert refused.value.code == "unsupported_parameter" and refused.value.param == param


def test_images_for_a_text_model_are_refused(agent) -> None:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client(agent).chat.completions.create(model="smol", messages=[{"role": "user", "content": parts}])
    assert refused.value.code == "unsupported_parameter" and "image_url" in str(refused.value.param)


def test_models_retrieve(agent) -> None:
    ai = client(agent)
    model = ai.models.retrieve("smol")
    assert model.id == "smol" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("gpt-4o")


def test_embeddings_for_gguf(agent) -> None:
    result = client(agent).embeddings.create(model="smol", input=["a red apple", "the sea"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == len(result.data[1].embedding) > 0
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_cors_only_for_allowed_origins(agent) -> None:
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{agent.url}/v1/chat/completions", headers=headers)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(f"{agent.url}/v1/chat/completions", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_vague_bodies_get_clear_400s(agent) -> None:
    plain = httpx.post(f"{agent.url}/v1/completions", content=b"hello", headers={"content-type": "text/plain"})
    assert plain.status_code == 400 and "application/json" in plain.json()["error"]["message"]
    empty = httpx.post(f"{agent.url}/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]


def _metric(agent: AgentProcess, name: str, default: float | None = None) -> float:
    for line in httpx.get(f"{agent.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise AssertionError(f"{name} not in metrics")
    return default


def test_full_queue_gets_429_and_oversize_bodies_413_before_the_model(agent, reference) -> None:
    ai = client(agent)
    input_before = _metric(agent, 'slmops_agent_tokens_total{type="input"}', default=0.0)
    busy = ai.completions.create(model="smol", prompt="Once upon a time", max_tokens=200, stream=True)
    next(iter(busy))  # the model is now generating for this request
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(ai.completions.create(model="smol", prompt="Hi", max_tokens=1)), daemon=True
    )
    waiter.start()
    wait_for(lambda: _metric(agent, "slmops_agent_requests_queued") == 1, what="a queued request", timeout_s=30)
    assert _metric(agent, "slmops_agent_requests_in_flight") == 1
    with pytest.raises(openai.RateLimitError) as full:
        ai.completions.create(model="smol", prompt="Hi", max_tokens=1)
    assert full.value.code == "queue_full" and int(full.value.response.headers["retry-after"]) >= 1
    oversize = httpx.post(
        f"{agent.url}/v1/completions", json={"model": "smol", "prompt": "word " * MAX_BODY, "max_tokens": 1}
    )
    assert oversize.status_code == 413 and oversize.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(  # no Content-Length: counted as it arrives
        f"{agent.url}/v1/completions",
        content=iter([b'{"model": "smol", "prompt": "', b"w" * MAX_BODY, b'", "max_tokens": 1}']),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert not queued  # answered while the model was still busy: nothing was tokenized
    busy.close()
    waiter.join(timeout=120)
    assert queued and queued[0].usage.completion_tokens == 1
    # Input tokens count the two prompts the model took, none of the refused ones.
    busy_prompt = len(reference.tokenize(b"Once upon a time", add_bos=False, special=True))
    expected = input_before + busy_prompt + queued[0].usage.prompt_tokens
    wait_for(lambda: _metric(agent, 'slmops_agent_tokens_total{type="input"}') == expected, what="accounting")


def test_client_mistakes_are_4xx_and_never_roll_back_a_trial(agent, artifacts, smol_sha) -> None:
    response = agent.apply(desired_for(artifacts, smol_sha, model="smol", version="2", n_ctx=N_CTX // 2))
    assert response.json()["phase"] == "on_trial" and response.json()["previous"]["version"] == "1"
    url = f"{agent.url}/v1"
    mistakes = [
        ("/completions", {"model": "smol", "prompt": "", "max_tokens": 4}),
        ("/completions", {"model": "smol", "prompt": "", "max_tokens": 4}),
        ("/completions", {"model": "smol", "prompt": "", "max_tokens": 4}),
        ("/completions", {"model": "smol", "prompt": "word " * 400, "max_tokens": 4}),
        ("/completions", {"model": "smol", "prompt": "hi", "max_tokens": 4, "n": 3}),
        ("/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "tools": []}),
        ("/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999}),
        ("/completions", {"model": "smol", "prompt": "hi", "response_format": {"type": "json_schema"}}),
    ]
    for path, body in mistakes:
        answer = httpx.post(url + path, json=body, timeout=120)
        assert 400 <= answer.status_code < 500, (body, answer.text)
        assert answer.json()["error"]["code"] != "generation_failed"
    assert agent.state()["phase"] == "on_trial"
    for _ in range(4):
        client(agent).completions.create(model="smol", prompt="Hello", max_tokens=1)
    wait_for(lambda: agent.state()["phase"] == "committed", what="the trial to commit", timeout_s=60)
    assert agent.state()["current"]["version"] == "2"
