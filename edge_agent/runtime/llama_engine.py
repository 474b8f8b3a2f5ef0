"""GGUF engine: llama-cpp-python's `Llama` behind the Engine protocol.

Chat prompts are rendered here from the model's own chat template (or the one given at load) and
tokenized once; generation runs llama.cpp's sampler token by token (`Llama.generate`), so the
prompt tokens reported are the ones evaluated, every generated token is counted however its text
is chunked, and a prompt that does not fit raises ContextOverflowError instead of llama-cpp-python
silently shortening `max_tokens`. A `Llama` object is not thread-safe: every call into it holds the engine's lock.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import llama_cpp

from edge_agent.runtime.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    GenerationLock,
    InvalidInput,
    ModelLoadError,
    Sampling,
    TokenChunk,
    TokenStream,
    UnsupportedOperation,
    call_with_timeout,
    check_context,
    sampling_of,
)
from edge_agent.runtime.chat_format import check_messages, format_default, render_template
from edge_agent.runtime.llama_sampling import TextAssembler, json_grammar, sampler_options, token_logprob


def _check_adapter_fits(model_path: Path, lora_path: Path) -> None:
    # llama.cpp crashes the process (SIGSEGV) on an adapter whose shapes do not match the base.
    from shared.formats.lora import lora_mismatches

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
                lora_path=str(self.lora_path) if self.lora_path else None,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python reports load failures as these
            raise ModelLoadError(f"llama.cpp cannot load {self.model_path}: {exc}") from exc
        self._n_threads = n_threads
        self._embedder: llama_cpp.Llama | None = None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
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

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, normalized embeddings of `texts` and the tokens they took."""
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            try:
                vectors, count = self._embedder.embed(texts, normalize=True, truncate=False, return_count=True)
            except ValueError as exc:  # longer than the context: the caller's input
                raise InvalidInput(f"input too long to embed: {exc}") from exc
            except RuntimeError as exc:
                raise EngineError(f"embedding failed: {exc}") from exc
        return cast("list[list[float]]", vectors), int(count)

    def _load_embedder(self) -> llama_cpp.Llama:
        # A second context on the same mmapped weights: generation keeps its own KV cache.
        try:
            return llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_batch=self.n_ctx,
                n_ubatch=self.n_ctx,
                n_threads=self._n_threads,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise UnsupportedOperation(f"{self.model_path.name} cannot embed: {exc}") from exc

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream:
        return self._start(self._tokenize(prompt), max_tokens, stop, sampling_of(temperature, sampling))

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
        if self._chat_template:
            prompt = render_template(self._chat_template, messages, bos_token=self._bos_text, eos_token=self._eos_text)
        else:
            prompt = format_default(messages)
        # Templates that write the BOS text themselves must not get a second BOS token.
        add_bos = not (self._bos_text and prompt.startswith(self._bos_text))
        tokens = self._tokenize(prompt, add_bos=add_bos)
        return self._start(tokens, max_tokens, stop, sampling_of(temperature, sampling))

    def _start(self, tokens: list[int], max_tokens: int, stop: list[str] | None, sampling: Sampling) -> TokenStream:
        if not tokens:
            raise InvalidInput("the prompt is empty: there is nothing to continue")
        check_context(prompt_tokens=len(tokens), max_tokens=max_tokens, n_ctx=self.n_ctx)
        grammar = json_grammar(sampling.json_schema) if sampling.json_schema is not None else None
        chunks = self._generate(tokens, max_tokens=max_tokens, sampling=sampling, grammar=grammar, stop=stop)
        return TokenStream(chunks, prompt_tokens=len(tokens))

    def _generate(
        self,
        tokens: list[int],
        *,
        max_tokens: int,
        sampling: Sampling,
        grammar: llama_cpp.LlamaGrammar | None,
        stop: list[str] | None,
    ) -> Generator[TokenChunk, None, None]:
        with self._lock:
            llm = self._live()
            llm.set_seed(sampling.seed if sampling.seed is not None else secrets.randbits(32))
            text = TextAssembler(llm, tokens, stop)
            finish, pending, generated = FINISH_LENGTH, 0, 0
            stream = llm.generate(tokens, grammar=grammar, **sampler_options(sampling))
            try:
                for token in stream:
                    if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                        finish = FINISH_STOP
                        break
                    generated += 1
                    pending += 1
                    logprobs = (token_logprob(llm, token, sampling.logprobs),) if sampling.logprobs is not None else ()
                    piece, stopped = text.feed(token)
                    if stopped:
                        yield TokenChunk(piece, FINISH_STOP, tokens=pending, logprobs=logprobs)
                        return
                    if piece or logprobs:
                        yield TokenChunk(piece, tokens=pending, logprobs=logprobs)
                        pending = 0
                    if generated >= max_tokens:
                        break
            except (RuntimeError, ValueError) as exc:
                raise EngineError(f"generation failed: {exc}") from exc
            finally:
                stream.close()
            yield TokenChunk(text.flush(), finish, tokens=pending)

    def smoke_test(self, timeout_s: float = 10.0) -> None:
        """Generate two tokens within `timeout_s`; raise EngineError otherwise."""

        def probe() -> None:
            chunks = list(self.complete("Hello", max_tokens=2))
            if chunks[-1].finish_reason is None:
                raise EngineError("generation ended without a finish reason")

        call_with_timeout(probe, timeout_s=timeout_s, what="smoke test")

    def close(self) -> None:
        with self._lock:
            for llm in (self._llm, self._embedder):
                if llm is not None:
                    llm.close()
            self._llm = self._embedder = None
