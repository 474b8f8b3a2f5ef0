"""The agent's inference engines on real tiny models: llama-cpp-python (GGUF) and onnxruntime (ONNX)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.runtime import (
    FINISH_LENGTH,
    FINISH_STOP,
    ContextOverflowError,
    Engine,
    EngineError,
    ModelLoadError,
    TokenChunk,
    UnsupportedOperation,
    load_engine,
)
from edge_agent.runtime.base import StopScanner

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _text(chunks: Iterator[TokenChunk] | list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


@pytest.fixture(params=[pytest.param("gguf", marks=pytest.mark.llama), "onnx"])
def engine(request: pytest.FixtureRequest, tiny_gguf: Path, tiny_onnx: Path) -> Iterator[Engine]:
    if request.param == "gguf":
        pytest.importorskip("llama_cpp")
    path = tiny_gguf if request.param == "gguf" else tiny_onnx
    loaded = load_engine(path, request.param, n_ctx=128, n_threads=1)
    yield loaded
    loaded.close()


def test_importing_the_runtime_package_loads_no_runtime() -> None:
    code = "import sys, edge_agent.runtime; print('llama_cpp' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_complete_streams_one_chunk_per_token_and_ends_with_length(engine: Engine) -> None:
    chunks = list(engine.complete("Hello", max_tokens=6))
    assert len(chunks) == 7  # six tokens, then the chunk carrying the finish reason
    assert [c.finish_reason for c in chunks[:-1]] == [None] * 6
    assert chunks[-1].finish_reason == FINISH_LENGTH
    assert _text(chunks).strip()


def test_greedy_generation_is_reproducible(engine: Engine) -> None:
    first = _text(engine.complete("The fleet", max_tokens=8))
    assert first == _text(engine.complete("The fleet", max_tokens=8))
    assert first != _text(engine.complete("Something else entirely", max_tokens=8))


def test_sampling_with_temperature_runs(engine: Engine) -> None:
    chunks = list(engine.complete("Hello", max_tokens=5, temperature=1.5))
    assert chunks[-1].finish_reason in (FINISH_LENGTH, FINISH_STOP)


def test_chat_streams_the_completion_of_the_templated_prompt(engine: Engine) -> None:
    chunks = list(engine.chat(MESSAGES, max_tokens=5))
    assert chunks[-1].finish_reason == FINISH_LENGTH
    assert len(chunks) == 6
    # Both tiny models use the `<|role|>` template, so chat is completion of the rendered prompt.
    rendered = "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert _text(chunks) == _text(engine.complete(rendered, max_tokens=5))
    assert engine.count_tokens(rendered) > engine.count_tokens("Hi there")


def test_stop_string_ends_generation_before_it(engine: Engine) -> None:
    full = _text(engine.complete("Hello", max_tokens=12))
    stop = full[3]
    chunks = list(engine.complete("Hello", max_tokens=12, stop=[stop]))
    assert chunks[-1].finish_reason == FINISH_STOP
    assert _text(chunks) == full[: full.index(stop)]


def test_context_overflow_is_refused_before_generating(engine: Engine) -> None:
    prompt = "x" * 100
    assert engine.count_tokens(prompt) > 100  # a BOS token plus at least one token per character
    with pytest.raises(ContextOverflowError) as info:
        list(engine.complete(prompt, max_tokens=40))
    assert info.value.n_ctx == 128
    with pytest.raises(ContextOverflowError):
        list(engine.chat([{"role": "user", "content": prompt}], max_tokens=40))
    assert len(list(engine.complete("x" * 10, max_tokens=40))) == 41


def test_count_tokens_grows_with_text(engine: Engine) -> None:
    assert engine.count_tokens("Hello world") > engine.count_tokens("Hello") > 0


def test_smoke_test_passes(engine: Engine) -> None:
    engine.smoke_test(timeout_s=30)


def test_concurrent_generation_matches_sequential(engine: Engine) -> None:
    prompts = ["alpha", "beta", "gamma", "delta"]
    expected = [_text(engine.complete(p, max_tokens=6)) for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: _text(engine.complete(p, max_tokens=6)), prompts * 2))
    assert got == expected * 2


def test_calling_the_engine_from_inside_its_stream_is_refused_not_deadlocked(engine: Engine) -> None:
    stream = engine.complete("Hello", max_tokens=4)
    next(stream)
    with pytest.raises(EngineError, match="inside one of its own streams"):
        list(engine.complete("Hi", max_tokens=1))
    stream.close()  # type: ignore[attr-defined]
    assert len(list(engine.complete("Hello", max_tokens=2))) == 3


def test_closed_engine_refuses_work(engine: Engine) -> None:
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        list(engine.complete("Hello", max_tokens=2))


def test_bad_messages_are_refused(engine: Engine) -> None:
    with pytest.raises(EngineError):
        list(engine.chat([], max_tokens=2))
    with pytest.raises(EngineError):
        list(engine.chat([{"role": "user"}], max_tokens=2))


@pytest.mark.llama
def test_gguf_engine_has_no_tensor_inference(tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    engine = load_engine(tiny_gguf, "gguf", n_ctx=64)
    with pytest.raises(UnsupportedOperation):
        engine.infer({"input_ids": [[1]]})
    engine.close()


@pytest.mark.llama
def test_lora_adapter_changes_generation(tiny_gguf: Path, tiny_lora_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    base = load_engine(tiny_gguf, "gguf", n_ctx=64)
    adapted = load_engine(tiny_gguf, "gguf", n_ctx=64, lora_path=tiny_lora_gguf)
    assert _text(base.complete("Hello", max_tokens=8)) != _text(adapted.complete("Hello", max_tokens=8))
    base.close()
    adapted.close()


@pytest.mark.llama
def test_custom_chat_template_is_used(tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    plain = load_engine(tiny_gguf, "gguf", n_ctx=128)
    custom = load_engine(tiny_gguf, "gguf", n_ctx=128, chat_template="{{ messages[-1]['content'] }}")
    # With a template that is only the last message, chat equals completing that message.
    assert _text(custom.chat(MESSAGES, max_tokens=6)) == _text(plain.complete("Hi there", max_tokens=6))
    plain.close()
    custom.close()


def test_chat_template_helpers_and_errors(tiny_onnx: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}"
        "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}"
    )
    engine = load_engine(tiny_onnx, "onnx", chat_template=template)
    with pytest.raises(EngineError, match="first message must be the user"):
        list(engine.chat(MESSAGES, max_tokens=2))
    # bos_token renders as the text "<s>", so the chat is the completion of "<s>Hi".
    assert _text(engine.chat([{"role": "user", "content": "Hi"}], max_tokens=4)) == _text(
        engine.complete("<s>Hi", max_tokens=4)
    )
    broken = load_engine(tiny_onnx, "onnx", chat_template="{% for %}")
    with pytest.raises(EngineError, match="chat template"):
        list(broken.chat(MESSAGES, max_tokens=2))


def test_onnx_infer_returns_json_tensors(tiny_onnx: Path) -> None:
    engine = load_engine(tiny_onnx, "onnx")
    out = engine.infer({"input_ids": [[1, 10, 11]]})
    assert len(out["logits"]) == 1 and len(out["logits"][0]) == 3 and len(out["logits"][0][0]) == 259
    with pytest.raises(EngineError, match="missing input"):
        engine.infer({})
    with pytest.raises(EngineError):
        engine.infer({"input_ids": [["not", "ints"]]})


def test_onnx_engine_serves_graphs_that_are_not_language_models(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    engine = load_engine(path, "onnx")
    engine.smoke_test(timeout_s=30)
    assert engine.infer({"x": [[-1.0, 0.5, 2.0]]}) == {"y": [[0.0, 0.5, 2.0]]}
    with pytest.raises(UnsupportedOperation, match="not a byte-level LM"):
        list(engine.complete("Hello", max_tokens=2))


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_missing_or_corrupt_files_fail_to_load(tmp_path: Path, fmt: str) -> None:
    if fmt == "gguf":
        pytest.importorskip("llama_cpp")
    with pytest.raises(ModelLoadError):
        load_engine(tmp_path / f"absent.{fmt}", fmt)
    corrupt = tmp_path / f"corrupt.{fmt}"
    corrupt.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelLoadError):
        load_engine(corrupt, fmt)


def test_unknown_format_and_onnx_lora_are_refused(tiny_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_engine(tiny_onnx, "safetensors")
    with pytest.raises(UnsupportedOperation):
        load_engine(tiny_onnx, "onnx", lora_path=tiny_onnx)


def test_stop_scanner_holds_back_partial_stop_strings() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed("abcE") == ("abc", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("x") == ("ENx", False)
    assert scanner.feed("yEND tail") == ("y", True)
