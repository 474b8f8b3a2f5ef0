"""The OpenAI response shapes of chat and text completions: choices, stream deltas, log-probabilities."""

from __future__ import annotations

import time
import uuid
from typing import Any

from edge_agent.runtime import TokenChunk, TokenLogprob


class ChatShape:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, fingerprint: str, want_logprobs: bool) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())
        self.fingerprint = fingerprint
        self.want_logprobs = want_logprobs

    def envelope(self, *, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.chunk_object if chunk else self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def choice(self, chunks: list[TokenChunk], finish: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
            "finish_reason": finish,
            "logprobs": self.logprobs(chunks),
        }

    def delta(self, chunk: TokenChunk, first: bool) -> dict[str, Any]:
        text, finish = chunk.text, chunk.finish_reason
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish and not text:
            delta = {}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": self.logprobs([chunk])}

    def logprobs(self, chunks: list[TokenChunk]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        content = [_chat_logprob(lp) for c in chunks for lp in c.logprobs]
        return {"content": content, "refusal": None}


class CompletionShape(ChatShape):
    object = chunk_object = "text_completion"

    def __init__(self, model: str, fingerprint: str, want_logprobs: bool) -> None:
        super().__init__(model, fingerprint, want_logprobs)
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self._offset = 0  # text offset of the next token, across stream chunks

    def choice(self, chunks: list[TokenChunk], finish: str | None) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": self.logprobs(chunks)}

    def delta(self, chunk: TokenChunk, first: bool) -> dict[str, Any]:
        return self.choice([chunk], chunk.finish_reason)

    def logprobs(self, chunks: list[TokenChunk]) -> dict[str, Any] | None:  # type: ignore[override]
        if not self.want_logprobs:
            return None
        items = [lp for c in chunks for lp in c.logprobs]
        offsets = []
        for lp in items:
            offsets.append(self._offset)
            self._offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{token: value for token, _, value in lp.top} for lp in items],
            "text_offset": offsets,
        }


def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token_bytes),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in lp.top],
    }
