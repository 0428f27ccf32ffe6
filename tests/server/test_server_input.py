"""Hostile client input: a clear 4xx naming the field, never a 500, never the fallback.

The server here has ``fallback_reply`` set, so a client error that reached the
runtime and failed there would come back as a 200 fallback completion.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mongars_llm.server import ServerConfig, create_app

pytestmark = pytest.mark.serve

FALLBACK = "The assistant is unavailable right now."
MESSAGES = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "general", "messages": MESSAGES, "max_tokens": 2}
COMPLETION = {"model": "general", "prompt": "Hello", "max_tokens": 2}
EMBEDDING = {"model": "embedding", "input": "Hello"}
MAX_INPUT_CHARS = 4000


@pytest.fixture(scope="module")
def server(serve: Any, server_settings: Any, runtime: Any, manager: Any) -> Iterator[Any]:
    settings = server_settings.model_copy(update={"fallback_reply": FALLBACK})
    config = ServerConfig(max_input_chars=MAX_INPUT_CHARS)
    with serve(create_app(settings, runtime, manager, config=config)) as server:
        yield server


def post(server: Any, path: str, body: dict[str, Any] | str) -> httpx.Response:
    """POST a JSON document; a str is sent as is (it may hold escapes json.dumps would
    not write, like a lone surrogate)."""
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{server.url}{path}",
        content=content.encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert "x-mongars-fallback" not in response.headers, response.text
    return response


def assert_error(response: httpx.Response, status: int, param: str, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["code"] == code, error
    return str(error["message"])


def _with(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**body, **fields}


LONE = "\\ud800"  # as it appears in the JSON text: valid JSON, not valid Unicode


@pytest.mark.parametrize(
    ("path", "document", "param"),
    [
        (
            "/v1/chat/completions",
            '{"model": "general", "max_tokens": 2, "messages": '
            f'[{{"role": "user", "content": "a{LONE}b"}}]}}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "general", "max_tokens": 2, "messages": [{"role": "user", '
            f'"content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "general", "max_tokens": 2, "stream": true, "stop": ["{LONE}"], '
            '"messages": [{"role": "user", "content": "hi"}]}',
            "stop[0]",
        ),
        ("/v1/completions", f'{{"model": "general", "prompt": "{LONE}"}}', "prompt"),
        ("/v1/completions", f'{{"model": "general", "prompt": ["ok", "{LONE}"]}}', "prompt[1]"),
        ("/v1/embeddings", f'{{"model": "embedding", "input": "{LONE}"}}', "input"),
        ("/v1/embeddings", f'{{"model": "embedding", "input": ["a", "x{LONE}"]}}', "input[1]"),
        (
            "/v1/embeddings",
            f'{{"model": "embedding", "input": "a", "instruction": "{LONE}"}}',
            "instruction",
        ),
        ("/v1/embeddings", f'{{"model": "{LONE}", "input": "a"}}', "model"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(
    server: Any, path: str, document: str, param: str
) -> None:
    message = assert_error(post(server, path, document), 400, param, "invalid_unicode")
    assert "surrogate" in message and param in message


def test_valid_surrogate_pairs_are_text(server: Any) -> None:
    response = post(server, "/v1/embeddings", '{"model": "embedding", "input": "\\ud83d\\ude00"}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_sampling_values_the_sampler_cannot_use_are_400(
    server: Any, path: str, body: dict[str, Any], stream: bool
) -> None:
    body = _with(body, stream=stream)
    message = assert_error(
        post(server, path, _with(body, seed=2**64)), 400, "seed", "invalid_value"
    )
    assert str(2**64) in message
    message = assert_error(
        post(server, path, _with(body, temperature=1e-300)), 400, "temperature", "invalid_value"
    )
    assert "use 0 for greedy" in message
    # the edges of what is accepted still generate
    for fields in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"temperature": 1e-5}, {}):
        response = post(server, path, _with(body, **fields))
        assert response.status_code == 200, (fields, response.text)
        assert FALLBACK not in response.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logit_bias": {"5": 100}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_unsupported_chat_options_are_400_not_ignored(
    server: Any, fields: dict[str, Any], param: str
) -> None:
    response = post(server, "/v1/chat/completions", _with(CHAT, **fields))
    message = assert_error(response, 400, param, "unsupported")
    assert param in message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"5": 100}}, "logit_bias"),
        ({"n": 3}, "n"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_unsupported_completion_options_are_400(
    server: Any, fields: dict[str, Any], param: str
) -> None:
    assert_error(
        post(server, "/v1/completions", _with(COMPLETION, **fields)), 400, param, "unsupported"
    )


def test_neutral_values_of_those_options_are_accepted(server: Any) -> None:
    neutral = {
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "logit_bias": {},
        "n": 1,
        "logprobs": False,
        "parallel_tool_calls": False,
    }
    response = post(server, "/v1/chat/completions", _with(CHAT, **neutral))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "fields", "param"),
    [
        ("/v1/chat/completions", CHAT, {"stream": "yes"}, "stream"),
        ("/v1/chat/completions", CHAT, {"stream": 1}, "stream"),
        (
            "/v1/chat/completions",
            CHAT,
            {"stream": True, "stream_options": {"include_usage": "true"}},
            "stream_options.include_usage",
        ),
        ("/v1/chat/completions", CHAT, {"logprobs": "no"}, "logprobs"),
        ("/v1/chat/completions", CHAT, {"temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", CHAT, {"temperature": True}, "temperature"),
        ("/v1/completions", COMPLETION, {"echo": "yes"}, "echo"),
    ],
)
def test_booleans_and_numbers_are_strict(
    server: Any, path: str, body: dict[str, Any], fields: dict[str, Any], param: str
) -> None:
    assert_error(post(server, path, _with(body, **fields)), 422, param, "invalid_value")


def test_instruction_is_bounded_like_any_input(server: Any, server_settings: Any) -> None:
    too_long = "x" * (MAX_INPUT_CHARS + 1)
    response = post(server, "/v1/embeddings", _with(EMBEDDING, instruction=too_long))
    message = assert_error(response, 413, "instruction", "input_too_long")
    assert "MONGARS_SERVER_MAX_INPUT_CHARS" in message
    # within the character limit, but more tokens than the model reads: refused once,
    # for the request, before any of its 32 inputs is tokenised with it
    max_tokens = server_settings.model.max_input_tokens
    many_tokens = " ".join(["fox"] * (max_tokens + 10))
    assert len(many_tokens) <= MAX_INPUT_CHARS
    body = _with(EMBEDDING, input=["a text"] * 32, instruction=many_tokens)
    message = assert_error(
        post(server, "/v1/embeddings", body), 413, "instruction", "input_too_long"
    )
    assert "MONGARS_MODEL__MAX_INPUT_TOKENS" in message
    # a normal instruction still works
    response = post(server, "/v1/embeddings", _with(EMBEDDING, instruction="Retrieve passages"))
    assert response.status_code == 200, response.text
