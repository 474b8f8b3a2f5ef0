"""Request bodies of the OpenAI-compatible endpoints: what a local model implements, and refusals.

Every option is either honoured or refused by name (400 `unsupported_parameter`); none is silently
ignored. Options OpenAI clients send that change nothing on a device (`user`, `metadata`) pass.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.api.errors import APIError, ApiErrorCode
from edge_agent.runtime import Sampling

# Unknown fields are kept so that they can be refused by name, not ignored.
_LENIENT = ConfigDict(extra="allow")
# Accepted and without effect on a device: identifiers for the caller's own bookkeeping.
_INERT = {"user", "metadata", "store", "service_tier"}


def unsupported(param: str, message: str | None = None) -> APIError:
    return APIError(
        400, message or f"{param} is not supported by this device", param=param, code=ApiErrorCode.UNSUPPORTED_PARAMETER
    )


class ContentPart(BaseModel):
    model_config = _LENIENT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text":  # images, audio, files: a text model cannot see them
                raise unsupported(f"messages[{index}].content[{j}].{part.type}", f"{part.type} input is not supported")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = _LENIENT
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = _LENIENT
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise APIError(
                400, "json_schema.schema is required", param="response_format", code=ApiErrorCode.INVALID_VALUE
            )
        return self.json_schema.schema_


class _Sampling(BaseModel):
    model_config = _LENIENT
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    # llama-server's and Ollama's extensions.
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repeat_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: int = Field(default=1, ge=1)

    def check_supported(self) -> None:
        """Raise `unsupported_parameter` for the first option this device does not implement."""
        if self.n > 1:  # a device serves one sequence at a time
            raise unsupported("n", "n > 1 is not supported: one choice per request")
        for name, value in (self.model_extra or {}).items():
            if name not in _INERT and value is not None:
                raise unsupported(name)

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def temperature_or_default(self) -> float:
        return 0.0 if self.temperature is None else self.temperature  # greedy unless asked: reproducible

    def sampling(self, logprobs: int | None) -> Sampling:
        return Sampling(
            temperature=self.temperature_or_default(),
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
            json_schema=self.response_format.schema_or_none() if self.response_format else None,
            logprobs=logprobs,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs", code=ApiErrorCode.INVALID_VALUE
            )
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(
                400, "exactly one prompt per request is supported", param="prompt", code=ApiErrorCode.INVALID_VALUE
            )
        return self.prompt[0]


class EmbeddingRequest(BaseModel):
    model_config = _LENIENT
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name not in _INERT and value is not None:
                raise unsupported(name)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if any(not text for text in texts):
            raise APIError(400, "input must not contain empty strings", param="input", code=ApiErrorCode.INVALID_VALUE)
        return texts


class InferRequest(BaseModel):
    model: str | None = None
    inputs: dict[str, Any]
