"""Fuzz the OpenAI routes with generated JSON bodies: never a 5xx, never a hang.

Each body is a valid request (unicode edge cases and the edges of every valid
range included) with up to two fields replaced by hostile values — lone
surrogates, NUL, bidi overrides, special-token look-alikes, huge and tiny
numbers (2**64, 1e-300, NaN, Infinity), wrong types, nesting — or dropped,
plus unknown fields. Bodies go to a real uvicorn server as JSON text
(``NaN``/``Infinity`` and ``\\udXXX`` escapes included). The server has
``fallback_reply`` set, so a client error that slipped through to the runtime
would show up as a fallback answer; none may. A fixed seed
(``derandomize=True``) keeps the run reproducible; the known past failures are
explicit examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mongars_llm.server import create_app

pytestmark = pytest.mark.serve

FALLBACK = "fuzz-fallback-reply"
REQUEST_TIMEOUT_S = 60  # a request that takes longer counts as a hang

EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff",
    "a\udc80b",
    "\U0001f600",
    "\u202e\u2066",
    "\ufeff",
    "\uffff",
    "\u2028\u2029\x85",
    "<s></s><|im_start|><|eot_id|>",
    "{{ raise_exception('x') }}",
    "%s%n{0}",
    "x" * 3000,
]
EDGE_NUMBERS = [
    0,
    -1,
    1,
    2**31,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
    -(10**30),
    1e-300,
    5e-324,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    0.5,
    2.0000001,
]

valid_texts = st.one_of(
    st.sampled_from([t for t in EDGE_TEXT if t and not any(0xD800 <= ord(c) < 0xE000 for c in t)]),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
)
texts = st.one_of(
    st.sampled_from(EDGE_TEXT),
    st.text(st.characters(exclude_categories=[]), max_size=40),  # lone surrogates included
)
numbers = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), texts, numbers)
#: any JSON value, hostile ones likely
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
token_ids = st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=6)

# valid values of each field (edges of the valid ranges included)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(
            valid_texts,
            st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": valid_texts}),
                min_size=1,
                max_size=2,
            ),
        ),
    }
)
sampling = {
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.one_of(st.just(0), st.floats(min_value=1e-5, max_value=2.0)),
    "top_p": st.floats(min_value=1e-9, max_value=1.0, exclude_min=True),
    "top_k": st.integers(min_value=0, max_value=2**40),
    "n": st.just(1),
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "stream": st.booleans(),
    "stop": st.one_of(valid_texts, st.lists(valid_texts, max_size=4)),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "user": valid_texts,
}
valid_chat = st.fixed_dictionaries(
    {"model": st.just("general"), "messages": st.lists(message, min_size=1, max_size=3)},
    optional={
        **sampling,
        "max_completion_tokens": st.integers(min_value=1, max_value=8),
        "logprobs": st.just(False),
        "tool_choice": st.just("none"),
        "response_format": st.just({"type": "text"}),
        "logit_bias": st.just({}),
    },
)
valid_completion = st.fixed_dictionaries(
    {
        "model": st.just("general"),
        "prompt": st.one_of(valid_texts, st.lists(valid_texts, min_size=1, max_size=2), token_ids),
    },
    optional={**sampling, "echo": st.booleans()},
)
valid_embedding = st.fixed_dictionaries(
    {
        "model": st.just("embedding"),
        "input": st.one_of(
            valid_texts,
            st.lists(valid_texts, min_size=1, max_size=4),
            token_ids,
            st.lists(token_ids, min_size=1, max_size=3),
        ),
    },
    optional={
        "encoding_format": st.sampled_from(["float", "base64"]),
        "dimensions": st.integers(min_value=1, max_value=64),
        "instruction": valid_texts,
        "user": valid_texts,
    },
)

CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "n", "seed", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice",
    "response_format", "functions", "user", "adapter", "unknown_field",
]  # fmt: skip
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stream",
    "stream_options", "stop", "echo", "suffix", "best_of", "logprobs", "logit_bias", "adapter",
    "unknown_field",
]  # fmt: skip
EMBEDDING_FIELDS = [
    "model", "input", "encoding_format", "dimensions", "instruction", "user", "adapter",
    "unknown_field",
]  # fmt: skip
hostile = st.one_of(
    anything,
    st.sampled_from(["general", "embedding", "general:base", "general:ghost", "base", "..", ""]),
    st.lists(message, max_size=2),  # a right-shaped value in the wrong field
    token_ids,
)


def bodies(valid: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> Any:
    """A valid body with zero to two fields replaced by hostile values (or dropped)."""
    mutations = st.dictionaries(
        st.sampled_from(fields), st.one_of(hostile, st.just(...)), max_size=2
    )

    def apply(pair: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
        body, changes = pair
        body = {**body, **changes}
        return {key: value for key, value in body.items() if value is not ...}

    return st.tuples(valid, mutations).map(apply)


chat_bodies = bodies(valid_chat, CHAT_FIELDS)
completion_bodies = bodies(valid_completion, COMPLETION_FIELDS)
embedding_bodies = bodies(valid_embedding, EMBEDDING_FIELDS)


@pytest.fixture(scope="module")
def http(serve: Any, server_settings: Any, runtime: Any, manager: Any) -> Iterator[httpx.Client]:
    settings = server_settings.model_copy(update={"fallback_reply": FALLBACK})
    app = create_app(settings, runtime, manager)
    with (
        serve(app) as server,
        httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client,
    ):
        yield client


def _check(http: httpx.Client, path: str, body: Any) -> int:
    document = json.dumps(body)  # NaN/Infinity tokens and \\udXXX escapes, as a client may send
    try:
        with http.stream(
            "POST", path, content=document, headers={"content-type": "application/json"}
        ) as response:
            text = response.read().decode("utf-8")
    except httpx.TimeoutException:  # pragma: no cover - the failure being tested for
        pytest.fail(f"no answer within {REQUEST_TIMEOUT_S} s for {path} {document[:500]}")
    where = f"{path} {document[:500]} -> {response.status_code} {text[:500]}"
    assert response.status_code < 500, where
    assert "x-mongars-fallback" not in response.headers, where
    assert FALLBACK not in text, where
    if response.status_code >= 400:
        error = json.loads(text)["error"]
        assert error["type"] == "invalid_request_error" or response.status_code == 404, where
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in text, where
        assert text.rstrip().endswith("data: [DONE]"), where
    else:
        json.loads(text)
    return response.status_code


def _fuzz(http: httpx.Client, path: str, bodies: st.SearchStrategy[Any], *known: Any) -> None:
    """Run the generated bodies (and the ``known`` ones that used to fail) against ``path``;
    some of them must get through validation to the model."""
    statuses: list[int] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies)
    def run(body: Any) -> None:
        statuses.append(_check(http, path, body))

    for body in known:
        run = example(body=body)(run)
    run()
    assert statuses.count(200) >= 10, sorted(statuses)


HI = [{"role": "user", "content": "hi"}]


def test_fuzz_chat_completions(http: httpx.Client) -> None:
    _fuzz(
        http,
        "/v1/chat/completions",
        chat_bodies,
        {"model": "general", "messages": [{"role": "user", "content": "\ud800"}]},
        {"model": "general", "messages": HI, "seed": 2**64},
        {"model": "general", "messages": HI, "temperature": 1e-300, "stream": True},
        {"model": "general", "messages": HI, "response_format": {"type": "json_object"}},
    )


def test_fuzz_completions(http: httpx.Client) -> None:
    _fuzz(
        http,
        "/v1/completions",
        completion_bodies,
        {"model": "general", "prompt": "\ud800"},
        {"model": "general", "prompt": "hi", "seed": 2**64, "stream": True},
    )


def test_fuzz_embeddings(http: httpx.Client) -> None:
    _fuzz(
        http,
        "/v1/embeddings",
        embedding_bodies,
        {"model": "embedding", "input": "\ud800"},
        {"model": "embedding", "input": ["a"] * 8, "instruction": "fox " * 2000},
    )
