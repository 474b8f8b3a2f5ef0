"""ONNX engine: raw tensor inference for any model, byte-level generation for byte LMs.

A byte LM (like `slmops.tinymodels.onnx_tiny`) takes `input_ids` int64 [batch, seq] and returns
`logits` [batch, seq, 259]: ids 0 <unk>, 1 <s>, 2 </s>, byte b is 3 + b. Generation re-runs the
whole sequence each step (no KV cache), which is fine for the tiny models this serves.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Generator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.runtime.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    GenerationLock,
    ModelLoadError,
    Sampling,
    StopScanner,
    TokenChunk,
    TokenStream,
    UnsupportedOperation,
    UnsupportedParameter,
    call_with_timeout,
    check_context,
    sampling_of,
)
from edge_agent.runtime.chat_format import check_messages, format_default, render_template
from shared.formats.byte_vocab import BYTE_OFFSET, BYTE_VOCAB, EOS_ID, encode_bytes

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OnnxEngine:
    """An onnxruntime CPU session behind the Engine protocol."""

    format = "onnx"

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 512,
        n_threads: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self._chat_template = chat_template
        self._lock = GenerationLock()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings about unused initializers are noise
        if n_threads:
            options.intra_op_num_threads = n_threads
        if not self.model_path.is_file():
            raise ModelLoadError(f"model file not found: {self.model_path}")
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"onnxruntime cannot load {self.model_path}: {exc}") from exc
        self.is_byte_lm = self._looks_like_byte_lm(self._session)

    @staticmethod
    def _looks_like_byte_lm(session: ort.InferenceSession) -> bool:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        return (
            [i.name for i in inputs] == ["input_ids"]
            and inputs[0].type == "tensor(int64)"
            and outputs[0].name == "logits"
            and outputs[0].shape[-1] == BYTE_VOCAB
        )

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise EngineError("engine is closed")
        return self._session

    def encode(self, text: str) -> list[int]:
        """Prompt token ids: <s> then one id per UTF-8 byte."""
        return encode_bytes(text)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the graph on JSON-style inputs (nested lists); outputs come back as nested lists."""
        session = self._live_session()
        feeds: dict[str, np.ndarray] = {}
        for spec in session.get_inputs():
            if spec.name not in inputs:
                raise EngineError(f"missing input {spec.name!r}")
            dtype = _ORT_TO_NUMPY.get(spec.type)
            if dtype is None:
                raise UnsupportedOperation(f"input {spec.name!r} has unsupported type {spec.type}")
            try:
                feeds[spec.name] = np.asarray(inputs[spec.name], dtype=dtype)
            except (ValueError, TypeError) as exc:
                raise EngineError(f"input {spec.name!r} is not a {spec.type}: {exc}") from exc
        names = [o.name for o in session.get_outputs()]
        with self._lock:
            try:
                results = session.run(names, feeds)
            except Exception as exc:  # shape or type mismatches surface as onnxruntime errors
                raise EngineError(f"inference failed: {exc}") from exc
        return {name: np.asarray(value).tolist() for name, value in zip(names, results, strict=True)}

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise UnsupportedOperation(f"{self.model_path.name} is an ONNX model: embeddings need a GGUF model")

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream:
        chosen = sampling_of(temperature, sampling)
        _check_sampling(chosen)
        ids = self._prepare(self.encode(prompt), max_tokens)
        chunks = self._generate(ids, max_tokens=max_tokens, sampling=chosen, stop=stop)
        return TokenStream(chunks, prompt_tokens=len(ids))

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream:
        check_messages(messages)
        if self._chat_template is None:
            prompt = format_default(messages)
        else:
            prompt = render_template(self._chat_template, messages, bos_token="<s>", eos_token="</s>")
        return self.complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop, sampling=sampling)

    def _prepare(self, ids: list[int], max_tokens: int) -> list[int]:
        self._live_session()
        if not self.is_byte_lm:
            raise UnsupportedOperation(f"{self.model_path.name} is not a byte-level LM; use infer()")
        check_context(prompt_tokens=len(ids), max_tokens=max_tokens, n_ctx=self.n_ctx)
        return ids

    def _generate(
        self, ids: list[int], *, max_tokens: int, sampling: Sampling, stop: list[str] | None
    ) -> Generator[TokenChunk, None, None]:
        rng = np.random.default_rng(sampling.seed if sampling.seed is not None else secrets.randbits(64))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(stop)
        with self._lock:
            for _ in range(max_tokens):
                token = self._next_token(ids, sampling.temperature, rng)
                if token == EOS_ID:
                    yield TokenChunk(scanner.flush() + decoder.decode(b"", final=True), FINISH_STOP, tokens=0)
                    return
                ids.append(token)
                piece = decoder.decode(bytes([token - BYTE_OFFSET])) if token >= BYTE_OFFSET else ""
                text, stopped = scanner.feed(piece)
                if stopped:
                    yield TokenChunk(text, FINISH_STOP)
                    return
                yield TokenChunk(text)
            yield TokenChunk(scanner.flush() + decoder.decode(b"", final=True), FINISH_LENGTH, tokens=0)

    def _next_token(self, ids: list[int], temperature: float, rng: np.random.Generator) -> int:
        session = self._live_session()
        logits = session.run(["logits"], {"input_ids": np.asarray([ids], dtype=np.int64)})[0][0, -1]
        if temperature <= 0.0:
            return int(np.argmax(logits))
        scaled = (logits - logits.max()) / temperature
        probs = np.exp(scaled.astype(np.float64))
        return int(rng.choice(len(probs), p=probs / probs.sum()))

    def smoke_test(self, timeout_s: float = 10.0) -> None:
        """A 2-token generation for byte LMs; one run on zero-filled inputs for other graphs."""

        def probe() -> None:
            if self.is_byte_lm:
                chunks = list(self.complete("Hello", max_tokens=2))
                if chunks[-1].finish_reason is None:
                    raise EngineError("generation ended without a finish reason")
            else:
                self.infer(self._zero_inputs())

        call_with_timeout(probe, timeout_s=timeout_s, what="smoke test")

    def _zero_inputs(self) -> dict[str, Any]:
        # Symbolic or unknown dimensions become 1: the smallest input every graph should accept.
        inputs: dict[str, Any] = {}
        for spec in self._live_session().get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            inputs[spec.name] = np.zeros(shape, dtype=_ORT_TO_NUMPY.get(spec.type, np.float32)).tolist()
        return inputs

    def close(self) -> None:
        with self._lock:
            self._session = None


def _check_sampling(sampling: Sampling) -> None:
    """Byte LMs sample by temperature and seed only; any other option is refused by name."""
    default = Sampling()
    for option in fields(Sampling):
        if option.name in ("temperature", "seed"):
            continue
        if getattr(sampling, option.name) != getattr(default, option.name):
            name = {"json_schema": "response_format"}.get(option.name, option.name)
            raise UnsupportedParameter(name, f"{name} is not supported for ONNX byte-level models")
