"""Turning chat messages into a prompt: the model's Jinja chat template, or a plain default."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from edge_agent.runtime.base import EngineError


def format_default(messages: list[dict[str, str]]) -> str:
    """`<|role|>` headers, one message per block, then the assistant header (no Jinja needed)."""
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


def render_template(template: str, messages: list[dict[str, str]], *, bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face style chat template in a sandbox, as llama.cpp's servers do."""
    try:
        from jinja2 import TemplateError
    except ImportError as exc:  # jinja2 arrives with llama-cpp-python; an ONNX-only device may lack it
        raise EngineError("a custom chat template needs the jinja2 package") from exc
    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as exc:
        raise EngineError(f"chat template failed: {exc}") from exc


# Compiling is ~100x the cost of rendering (1.1 ms vs 0.01 ms for SmolLM2's template): once per
# template, not per request (docs/performance.md, "lean agent").
@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # Helpers that Hugging Face chat templates call (Llama 3, Mistral and others use them).
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
    return env.from_string(template)


def _raise_template_error(message: str) -> None:
    raise EngineError(f"chat template refused the messages: {message}")


def check_messages(messages: list[dict[str, str]]) -> None:
    """Every message needs a string role and content; an empty conversation is refused."""
    if not messages:
        raise EngineError("chat needs at least one message")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EngineError(f"chat message needs string 'role' and 'content': {m!r}")
