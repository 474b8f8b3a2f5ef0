"""Chat templates are compiled once per template, and rendered per request."""

from __future__ import annotations

import pytest

from edge_agent.runtime import chat_format
from edge_agent.runtime.base import EngineError

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)


def test_a_template_is_compiled_once_and_rendered_per_request() -> None:
    template = TEMPLATE + "{# compiled-once #}"
    misses = chat_format._compiled.cache_info().misses
    first = chat_format.render_template(template, [{"role": "user", "content": "one"}])
    second = chat_format.render_template(template, [{"role": "user", "content": "two"}])
    assert (first, second) == ("<user>one<a>", "<user>two<a>")
    assert chat_format._compiled.cache_info().misses == misses + 1


def test_a_broken_template_fails_every_time_and_the_sandbox_still_holds() -> None:
    for _ in range(2):
        with pytest.raises(EngineError, match="chat template failed"):
            chat_format.render_template("{% for m in messages %}", [{"role": "user", "content": "x"}])
    escape = "{{ messages.__class__.__mro__ }}"
    for _ in range(2):
        with pytest.raises(EngineError):
            chat_format.render_template(escape, [{"role": "user", "content": "x"}])
    refusing = "{{ raise_exception('no system role') }}"
    with pytest.raises(EngineError, match="refused the messages: no system role"):
        chat_format.render_template(refusing, [{"role": "user", "content": "x"}])
