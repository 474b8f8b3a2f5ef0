"""What the GGUF engine hands llama.cpp per request: sampler options, JSON grammars, log-probabilities, text."""

from __future__ import annotations

import codecs
import json
from typing import Any

import llama_cpp
import numpy as np

from edge_agent.runtime.base import InvalidInput, Sampling, StopScanner, TokenLogprob

# llama.cpp's generic grammar of a JSON object (what `response_format: json_object` asks for).
_ANY_OBJECT_GBNF = llama_cpp.llama_grammar.JSON_GBNF


def sampler_options(sampling: Sampling) -> dict[str, Any]:
    """`Llama.generate` keyword arguments for `sampling` (llama-cpp-python's own defaults are not OpenAI's)."""
    return {
        "temp": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "typical_p": 1.0,
        "repeat_penalty": sampling.repeat_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
    }


def json_grammar(schema: dict[str, Any]) -> llama_cpp.LlamaGrammar:
    """A grammar that admits only JSON matching `schema`; an empty schema admits any JSON object."""
    try:
        if not schema:
            return llama_cpp.LlamaGrammar.from_string(_ANY_OBJECT_GBNF, verbose=False)
        return llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise InvalidInput(f"response_format: the JSON schema cannot be turned into a grammar: {exc}") from exc


def token_logprob(llm: llama_cpp.Llama, token: int, top_n: int) -> TokenLogprob:
    """The model's log-probability of `token` at the position just sampled, and the `top_n` most likely.

    Read before the next evaluation overwrites the context's logits.
    """
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best: list[int] = np.argsort(-logprobs)[:top_n].tolist() if top_n > 0 else []
    top = tuple((*_piece(llm, i), float(logprobs[i])) for i in best)
    return TokenLogprob(*_piece(llm, token), float(logprobs[token]), top)


def _piece(llm: llama_cpp.Llama, token: int) -> tuple[str, bytes]:
    raw = llm.detokenize([token], special=True)
    return raw.decode("utf-8", errors="replace"), raw


class TextAssembler:
    """Generated tokens to text: whole UTF-8 characters only, stop strings held back and cut off."""

    def __init__(self, llm: llama_cpp.Llama, prompt: list[int], stop: list[str] | None) -> None:
        self._llm = llm
        self._history = list(prompt)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopScanner(stop)

    def feed(self, token: int) -> tuple[str, bool]:
        raw = self._llm.detokenize([token], prev_tokens=self._history)
        self._history.append(token)
        return self._stops.feed(self._decoder.decode(raw))

    def flush(self) -> str:
        return self._stops.flush() + self._decoder.decode(b"", final=True)
