"""GGUF engine: llama-cpp-python's `Llama` behind the Engine protocol.

Chat prompts are rendered here from the model's own chat template (or the one given at load), then
generated with `create_completion`, so prompt tokens are counted before generation and a prompt
that does not fit raises ContextOverflowError instead of llama-cpp-python silently shortening
`max_tokens`. A `Llama` object is not thread-safe: every call into it holds the engine's lock.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import llama_cpp

from edge_agent.runtime.base import (
    FINISH_LENGTH,
    EngineError,
    GenerationLock,
    ModelLoadError,
    TokenChunk,
    UnsupportedOperation,
    call_with_timeout,
    check_context,
)
from edge_agent.runtime.chat_format import check_messages, format_default, render_template

SEED = 0


def _check_adapter_fits(model_path: Path, lora_path: Path) -> None:
    # llama.cpp crashes the process (SIGSEGV) on an adapter whose shapes do not match the base.
    from slmops.modelopt.lora import lora_mismatches

    problems = lora_mismatches(model_path, lora_path)
    if problems:
        shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        raise ModelLoadError(f"LoRA adapter {lora_path.name} does not fit {model_path.name}: {shown}")


class LlamaEngine:
    """A GGUF model loaded with llama-cpp-python (CPU)."""

    format = "gguf"

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 512,
        n_threads: int | None = None,
        lora_path: Path | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.lora_path = Path(lora_path) if lora_path else None
        self._lock = GenerationLock()
        for path in filter(None, (self.model_path, self.lora_path)):
            if not path.is_file():
                raise ModelLoadError(f"model file not found: {path}")
        if self.lora_path is not None:
            _check_adapter_fits(self.model_path, self.lora_path)
        try:
            self._llm: llama_cpp.Llama | None = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                seed=SEED,
                lora_path=str(self.lora_path) if self.lora_path else None,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python reports load failures as these
            raise ModelLoadError(f"llama.cpp cannot load {self.model_path}: {exc}") from exc
        self._chat_template = chat_template or self._llm.metadata.get("tokenizer.chat_template")
        self._bos_text = self._token_text(self._llm.token_bos())
        self._eos_text = self._token_text(self._llm.token_eos())

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._live().detokenize([token], special=True).decode("utf-8", errors="replace")

    def _live(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise EngineError("engine is closed")
        return self._llm

    def _tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        with self._lock:
            return self._live().tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise UnsupportedOperation("raw tensor inference applies to ONNX models, not GGUF")

    def complete(
        self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[TokenChunk]:
        tokens = self._tokenize(prompt)
        check_context(prompt_tokens=len(tokens), max_tokens=max_tokens, n_ctx=self.n_ctx)
        return self._generate(tokens, max_tokens=max_tokens, temperature=temperature, stop=stop)

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> Iterator[TokenChunk]:
        check_messages(messages)
        if self._chat_template:
            prompt = render_template(self._chat_template, messages, bos_token=self._bos_text, eos_token=self._eos_text)
        else:
            prompt = format_default(messages)
        # Templates that write the BOS text themselves must not get a second BOS token.
        add_bos = not (self._bos_text and prompt.startswith(self._bos_text))
        tokens = self._tokenize(prompt, add_bos=add_bos)
        check_context(prompt_tokens=len(tokens), max_tokens=max_tokens, n_ctx=self.n_ctx)
        return self._generate(tokens, max_tokens=max_tokens, temperature=temperature, stop=stop)

    def _generate(
        self, tokens: list[int], *, max_tokens: int, temperature: float, stop: list[str] | None
    ) -> Iterator[TokenChunk]:
        with self._lock:
            # stream=True makes this a generator of completion chunks (the stub types a union).
            stream = cast(
                "Generator[dict[str, Any], None, None]",
                self._live().create_completion(
                    tokens,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    stop=stop or [],
                    seed=SEED,
                    stream=True,
                ),
            )
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    finish = choice["finish_reason"]
                    yield TokenChunk(choice["text"], finish)
                    if finish is not None:
                        return
            except (RuntimeError, ValueError) as exc:
                raise EngineError(f"generation failed: {exc}") from exc
            finally:
                stream.close()
            # A stream that ends without a reason still ends with exactly one final chunk.
            yield TokenChunk("", FINISH_LENGTH)

    def smoke_test(self, timeout_s: float = 10.0) -> None:
        """Generate two tokens within `timeout_s`; raise EngineError otherwise."""

        def probe() -> None:
            chunks = list(self.complete("Hello", max_tokens=2))
            if chunks[-1].finish_reason is None:
                raise EngineError("generation ended without a finish reason")

        call_with_timeout(probe, timeout_s=timeout_s, what="smoke test")

    def close(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
