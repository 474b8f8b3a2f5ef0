"""OpenAI-compatible `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/models`."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edge_agent.api.errors import APIError, ApiErrorCode, model_unavailable
from edge_agent.api.generation import Generation, StartStream, check_model_name
from edge_agent.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from edge_agent.api.shapes import ChatShape, CompletionShape
from edge_agent.runtime import Engine, EngineError, InvalidInput, TokenChunk, UnsupportedOperation
from edge_agent.serving import NoModelError, ServingModel
from edge_agent.telemetry import RequestRecord

router = APIRouter(prefix="/v1", tags=["openai"])

# Reply budget when a chat request names none: bounded, so one request cannot hold the model long.
DEFAULT_CHAT_MAX_TOKENS = 128
# Pause between SSE writes while streaming; small against human reading speed and network jitter.
STREAM_FLUSH_INTERVAL_S = 0.002


def _model_card(current: ServingModel) -> dict[str, Any]:
    return {
        "id": current.spec.model,
        "object": "model",
        "created": int(time.time() - (time.monotonic() - current.loaded_at)),
        "owned_by": "slmops",
        "version": current.spec.version,
        "sha256": current.spec.artifact.sha256,
    }


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    current = request.app.state.agent.slot.current
    return {"object": "list", "data": [] if current is None else [_model_card(current)]}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    current = request.app.state.agent.slot.current
    if current is None or model_id not in (current.spec.model, f"{current.spec.model}:{current.spec.version}"):
        message = f"the model {model_id!r} does not exist on this device"
        raise APIError(404, message, param="model", code=ApiErrorCode.MODEL_NOT_FOUND)
    return _model_card(current)


def _fingerprint(request: Request) -> str:
    current = request.app.state.agent.slot.current
    return f"slmops:{current.spec.model}:{current.spec.version}" if current is not None else "slmops"


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    body.check_supported()
    messages = body.plain_messages()
    logprobs = body.logprobs_wanted()
    sampling = body.sampling(logprobs)

    def start(engine: Engine) -> Any:
        return engine.chat(
            messages,
            # Unasked, the reply may use half the context: a short prompt then always fits.
            max_tokens=body.token_limit(min(DEFAULT_CHAT_MAX_TOKENS, max(engine.n_ctx // 2, 1))),
            stop=body.stop_list(),
            sampling=sampling,
        )

    shape = ChatShape(body.model, _fingerprint(request), logprobs is not None)
    return await _respond(request, "chat", body, start, shape)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    body.check_supported()
    prompt = body.prompt_text()
    sampling = body.sampling(body.logprobs)

    def start(engine: Engine) -> Any:
        return engine.complete(prompt, max_tokens=body.max_tokens, stop=body.stop_list(), sampling=sampling)

    shape = CompletionShape(body.model, _fingerprint(request), body.logprobs is not None)
    return await _respond(request, "text_completion", body, start, shape)


async def _respond(
    request: Request,
    operation: str,
    body: ChatCompletionRequest | CompletionRequest,
    start: StartStream,
    shape: ChatShape,
) -> JSONResponse | StreamingResponse:
    agent, queue = request.app.state.agent, request.app.state.queue
    gen = Generation(agent, queue, operation, body.model, start, stream=body.stream)
    first = await gen.open()
    if not body.stream:
        return await _collect(gen, first, shape)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _GenerationStream(_sse(gen, first, shape, include_usage), gen)


class _GenerationStream(StreamingResponse):
    """SSE that returns the model and its queue turn even if the client leaves before the first write."""

    def __init__(self, content: AsyncIterator[str], gen: Generation) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gen.close(error=GeneratorExit())  # a no-op once the stream closed it


async def _collect(gen: Generation, first: list[TokenChunk], shape: ChatShape) -> JSONResponse:
    chunks = list(first)
    try:
        async for batch in gen.rest():
            chunks.extend(batch)
    except APIError as exc:
        gen.close(error=exc)
        raise
    gen.close()
    payload = shape.envelope(chunk=False) | {
        "choices": [shape.choice(chunks, gen.finish_reason or "stop")],
        "usage": _usage(gen),
    }
    return JSONResponse(payload)


async def _sse(gen: Generation, first: list[TokenChunk], shape: ChatShape, include_usage: bool) -> AsyncIterator[str]:
    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data = shape.envelope(chunk=True) | {"choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def events(batch: list[TokenChunk], first_event: bool) -> str:
        # One write per batch: each chunk is still its own SSE event, as OpenAI clients expect.
        return "".join(event([shape.delta(c, first_event and i == 0)]) for i, c in enumerate(batch))

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


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    body.check_supported()
    texts = body.texts()
    queue = request.app.state.queue
    await queue.enter()
    admitted = time.perf_counter()
    try:
        vectors, tokens = await _embed(request.app.state.agent, body.model, texts)
    finally:
        queue.leave(time.perf_counter() - admitted)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}


async def _embed(agent: Any, requested: str, texts: list[str]) -> tuple[list[list[float]], int]:
    """Embed on the serving model and account the request; only engine faults count against it."""
    started, tokens, model = time.perf_counter(), 0, None
    error: str | None = None
    try:
        with agent.slot.lease() as model:
            check_model_name(model, requested)
            vectors, tokens = await anyio.to_thread.run_sync(model.engine.embed, texts)
            return vectors, tokens
    except NoModelError as exc:
        error = ApiErrorCode.MODEL_NOT_LOADED
        raise model_unavailable(str(exc), exc.retry_after_s) from exc
    except (InvalidInput, UnsupportedOperation) as exc:  # the caller's input, or a model that cannot embed
        error = ApiErrorCode.INVALID_VALUE if isinstance(exc, InvalidInput) else ApiErrorCode.UNSUPPORTED_OPERATION
        raise APIError(
            400, str(exc), param="input" if error == ApiErrorCode.INVALID_VALUE else "model", code=error
        ) from exc
    except EngineError as exc:
        error = ApiErrorCode.EMBEDDING_FAILED
        raise APIError(500, f"embedding failed: {exc!r}", type_="server_error", code=error) from exc
    except APIError as exc:
        error = exc.code or ApiErrorCode.INVALID_REQUEST
        raise
    finally:
        engine_fault = error in (None, ApiErrorCode.EMBEDDING_FAILED)
        record = RequestRecord(time.perf_counter() - started, input_tokens=tokens, error_type=error)
        agent.record_request("embeddings", model if engine_fault else None, record)


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
