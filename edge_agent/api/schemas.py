"""Request bodies of the OpenAI-compatible endpoints (the subset a local model can honour)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Unknown fields are accepted and ignored, as the OpenAI clients send options we do not implement.
_LENIENT = ConfigDict(extra="allow")


class ContentPart(BaseModel):
    model_config = _LENIENT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = _LENIENT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = _LENIENT
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request: a device serves one sequence at a time

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def temperature_or_default(self) -> float:
        return 0.0 if self.temperature is None else self.temperature  # greedy unless asked: reproducible


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            from edge_agent.api.errors import APIError

            raise APIError(400, "exactly one prompt per request is supported", param="prompt", code="invalid_value")
        return self.prompt[0]


class InferRequest(BaseModel):
    model: str | None = None
    inputs: dict[str, Any]
