"""Chat templates render within bounds: a model file cannot freeze or exhaust the process."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from mongars_llm._chat_template import (
    ChatTemplateError,
    check_chat_template,
    render_chat_template,
)
from mongars_llm.testing import CHAT_TEMPLATE

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "What is 2 + 2? {{ not a template }}"},
]

#: a real template with loops, conditions, namespace, tojson and raise_exception
RICH_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{% if ns.system %}[SYS]{{ ns.system }}[/SYS]{% endif %}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('unknown role ' ~ m['role']) }}{% endif -%}"
    "<{{ m['role'] }}>{{ m['content'] | trim }}{{ {'n': loop.index} | tojson }}"
    "{%- if loop.last and add_generation_prompt %}<assistant>{% endif -%}"
    "{%- endfor -%}"
)


def _transformers_render(template: str, messages: list[dict[str, str]]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    return str(rendered[0])


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, RICH_TEMPLATE], ids=["chatml", "rich"])
def test_a_working_template_renders_as_transformers_does(template: str) -> None:
    ours = render_chat_template(template, MESSAGES, bos_token="<s>", eos_token="</s>")
    assert ours == _transformers_render(template, MESSAGES)
    check_chat_template(template, bos_token="<s>", eos_token="</s>")


LOOPS = {
    "nested-range-output": (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    ),
    "nested-range-silent": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "nested-variable": (
        "{% set x = range(100000) | list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}"
    ),
}

HUGE_VALUES = {
    "string-repeat": "{{ 'x' * 1000000000 }}",
    "list-repeat": "{{ ([1] * 1000000000) | length }}",
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "center-filter": "{{ 'x' | center(1000000000) }}",
    "format-width": "{{ '{:>1000000000}'.format('x') }}",
    "format-filter": "{{ '%1000000000s' | format('x') }}",
    "percent-width": "{{ '%1000000000s' % 'x' }}",
    "power": "{{ 9 ** 999999999 }}",
    "namespace-doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}"
    ),
    "macro-doubling": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
}


@pytest.mark.parametrize("template", LOOPS.values(), ids=LOOPS.keys())
def test_a_loop_bomb_stops_at_the_deadline(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError) as caught:
        render_chat_template(template, MESSAGES, timeout_s=0.5)
    assert time.monotonic() - started < 60  # unbounded, these loops run for hours
    message = str(caught.value)
    assert message.startswith("the model's chat template is broken: ") and "fix:" in message
    # the deadline stops it, or (a fast machine, a loop that writes) the output's size bound
    deadline = "rendering one conversation took more than 0.5 s" in message
    assert deadline or "more than the limit of 1000000" in message, message
    assert not caught.value.refused


@pytest.mark.parametrize("template", HUGE_VALUES.values(), ids=HUGE_VALUES.keys())
def test_a_huge_value_is_refused_before_it_is_built(template: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="chat template is broken: it builds a value"):
            render_chat_template(template, MESSAGES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024  # unbounded: gigabytes


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m.content }", "a syntax error on line 1"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses without end"),
        ("{{ messages[0].content.foo.bar }}", "rendering failed (UndefinedError"),
        ("{{ raise_exception('no') }}", "refuses even a one-message conversation (no)"),
    ],
    ids=["syntax", "recursion", "undefined", "refuses-everything"],
)
def test_a_broken_template_is_one_clear_error(template: str, expected: str) -> None:
    with pytest.raises(ChatTemplateError) as caught:
        check_chat_template(template)
    message = str(caught.value)
    assert message.startswith("the model's chat template is broken: ")
    assert expected in message
    assert "fix: give the model a working chat template" in message


def test_a_template_that_refuses_some_messages_is_not_broken() -> None:
    check_chat_template(RICH_TEMPLATE)  # fine for the sample conversations
    with pytest.raises(ChatTemplateError) as caught:
        render_chat_template(RICH_TEMPLATE, [{"role": "tool", "content": "x"}])
    assert caught.value.refused
    assert "refused these messages: unknown role tool" in str(caught.value)


def test_long_conversations_are_within_the_size_cap() -> None:
    messages = [{"role": "user", "content": "word " * 400_000}]  # 2,000,000 characters
    text = render_chat_template(CHAT_TEMPLATE, messages)
    assert len(text) > 2_000_000
