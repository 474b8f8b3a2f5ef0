"""OpenAI-compatible `/v1/chat/completions`, `/v1/completions` and `/v1/models`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edge_agent.api.errors import APIError
from edge_agent.api.generation import Generation, StartStream
from edge_agent.api.schemas import ChatCompletionRequest, CompletionRequest
from edge_agent.runtime import Engine, TokenChunk

router = APIRouter(prefix="/v1", tags=["openai"])

# Reply budget when a chat request names none: bounded, so one request cannot hold the model long.
DEFAULT_CHAT_MAX_TOKENS = 128
# Pause between SSE writes while streaming; small against human reading speed and network jitter.
STREAM_FLUSH_INTERVAL_S = 0.002


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    current = request.app.state.agent.slot.current
    data = []
    if current is not None:
        created = int(time.time() - (time.monotonic() - current.loaded_at))
        data.append(
            {
                "id": current.spec.model,
                "object": "model",
                "created": created,
                "owned_by": "slmops",
                "version": current.spec.version,
                "sha256": current.spec.artifact.sha256,
            }
        )
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    messages = body.plain_messages()

    def start(engine: Engine) -> Any:
        return engine.chat(
            messages,
            # Unasked, the reply may use half the context: a short prompt then always fits.
            max_tokens=body.token_limit(min(DEFAULT_CHAT_MAX_TOKENS, max(engine.n_ctx // 2, 1))),
            temperature=body.temperature_or_default(),
            stop=body.stop_list(),
        )

    def count(engine: Engine) -> int:
        return engine.count_tokens("\n".join(m["content"] for m in messages))

    shape = _ChatShape(body.model)
    return await _respond(request, "chat", body.model, body.stream, body, start, count, shape)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    prompt = body.prompt_text()

    def start(engine: Engine) -> Any:
        return engine.complete(
            prompt,
            max_tokens=body.max_tokens,
            temperature=body.temperature_or_default(),
            stop=body.stop_list(),
        )

    shape = _CompletionShape(body.model)
    return await _respond(
        request,
        "text_completion",
        body.model,
        body.stream,
        body,
        start,
        lambda e: e.count_tokens(prompt),
        shape,
    )


class _ChatShape:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }

    def delta(self, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish and not text:
            delta = {}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


class _CompletionShape(_ChatShape):
    object = chunk_object = "text_completion"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def delta(self, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        return self.choice(text, finish)


async def _respond(
    request: Request,
    operation: str,
    model: str,
    stream: bool,
    body: ChatCompletionRequest | CompletionRequest,
    start: StartStream,
    count: Callable[[Engine], int],
    shape: _ChatShape,
) -> JSONResponse | StreamingResponse:
    gen = Generation(request.app.state.agent, operation, model, start, count, stream=stream)
    first = await gen.open()
    if not stream:
        return await _collect(gen, first, shape)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(gen, first, shape, include_usage), media_type="text/event-stream")


async def _collect(gen: Generation, first: list[TokenChunk], shape: _ChatShape) -> JSONResponse:
    parts = [chunk.text for chunk in first]
    try:
        async for batch in gen.rest():
            parts.extend(chunk.text for chunk in batch)
    except APIError as exc:
        gen.close(error=exc)
        raise
    gen.close()
    payload = {
        "id": shape.id,
        "object": shape.object,
        "created": shape.created,
        "model": shape.model,
        "choices": [shape.choice("".join(parts), gen.finish_reason or "stop")],
        "usage": _usage(gen),
    }
    return JSONResponse(payload)


async def _sse(gen: Generation, first: list[TokenChunk], shape: _ChatShape, include_usage: bool) -> AsyncIterator[str]:
    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {
            "id": shape.id,
            "object": shape.chunk_object,
            "created": shape.created,
            "model": shape.model,
            "choices": choices,
        }
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def events(batch: list[TokenChunk], first_event: bool) -> str:
        # One write per batch: each token is still its own SSE event, as OpenAI clients expect.
        return "".join(
            event([shape.delta(c.text, c.finish_reason, first_event and i == 0)]) for i, c in enumerate(batch)
        )

    error: BaseException | None = None
    try:
        yield events(first, True)
        async for batch in gen.rest():
            yield events(batch, False)
            # Let a few tokens gather: one loop wake-up and one socket write per batch instead of
            # per token keeps the event loop off the GIL the generating thread needs.
            await asyncio.sleep(STREAM_FLUSH_INTERVAL_S)
        if include_usage:
            yield event([], _usage(gen))
        yield "data: [DONE]\n\n"
    except APIError as exc:
        error = exc
        yield f"data: {json.dumps(exc.body())}\n\n"
    except BaseException as exc:  # client went away (cancellation) or something unexpected
        error = exc
        raise
    finally:
        gen.close(error=error)


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.output_tokens,
        "total_tokens": gen.prompt_tokens + gen.output_tokens,
    }
