"""The OpenAI-compatible API, driven with the official ``openai`` client over HTTP."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from serving_support import MAX_NEW_TOKENS

pytestmark = pytest.mark.serve

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models_lists_roles_as_model_names(client: Any, runtime: Any) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[:2] == ["general", "embedding"]
    assert all(m.owned_by == "mongars-llm" for m in models.data)


def test_chat_completion_equals_the_runtime_reply(client: Any, runtime: Any) -> None:
    reply = client.chat.completions.create(
        model="general", messages=MESSAGES, max_tokens=8, temperature=0
    )
    expected = runtime.generate(MESSAGES, role="general", max_new_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens <= 8
    assert reply.model == "general"
    assert reply.id.startswith("chatcmpl-")


def test_streamed_chat_sends_deltas_then_finish_reason(client: Any, runtime: Any) -> None:
    expected = runtime.generate(MESSAGES, role="general", max_new_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="general",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(content) == expected.text
    # tokens arrive as generated: one delta per decoded piece, not one blob at the end
    assert len(content) >= min(2, expected.usage.completion_tokens)
    assert finishes[-1] == expected.finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format_ends_with_done(live_server: Any) -> None:
    body = {"model": "general", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_completion_uses_the_raw_prompt(client: Any, runtime: Any) -> None:
    reply = client.completions.create(
        model="general", prompt="The quick brown fox", max_tokens=6, temperature=0
    )
    expected = runtime.generate("The quick brown fox", max_new_tokens=6, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    streamed = client.completions.create(
        model="general", prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_embeddings_base64_by_default_equal_runtime_embed(client: Any, runtime: Any) -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    response = client.embeddings.create(model="embedding", input=texts)  # base64 on the wire
    expected = runtime.embed(texts)
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert got.shape == expected.shape == (2, runtime.hidden_size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [d.index for d in response.data] == [0, 1]
    assert response.usage.prompt_tokens == sum(runtime.count_tokens(t) for t in texts)


def test_embeddings_float_and_base64_wire_formats(live_server: Any, runtime: Any) -> None:
    text = "Embeddings map text to vectors."
    expected = runtime.embed([text])[0]
    url = f"{live_server.url}/v1/embeddings"
    as_float = httpx.post(
        url, json={"model": "embedding", "input": text, "encoding_format": "float"}
    )
    as_b64 = httpx.post(
        url, json={"model": "embedding", "input": text, "encoding_format": "base64"}
    )
    floats = np.array(as_float.json()["data"][0]["embedding"], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(as_b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(floats, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(decoded, floats)


def test_embedding_dimensions_truncate_and_renormalise(client: Any, runtime: Any) -> None:
    text = "LoRA adapters fine-tune a large model."
    full = runtime.embed([text])[0]
    short = client.embeddings.create(
        model="embedding", input=text, dimensions=8, extra_body={"force_dimensions": True}
    )
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (8,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, full[:8] / np.linalg.norm(full[:8]), rtol=1e-5, atol=1e-6)


def test_embedding_of_token_ids_and_instruction(client: Any, runtime: Any) -> None:
    text = "Question: what is two plus two?"
    ids = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model="embedding", input=[ids])
    np.testing.assert_allclose(
        by_ids.data[0].embedding, runtime.embed([text])[0], rtol=1e-5, atol=1e-6
    )
    assert by_ids.usage.prompt_tokens == len(ids)
    instructed = client.embeddings.create(
        model="embedding", input=text, extra_body={"instruction": "Retrieve the answer:"}
    )
    expected = runtime.embed([text], instruction="Retrieve the answer:")[0]
    np.testing.assert_allclose(instructed.data[0].embedding, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, runtime.embed([text])[0])


def test_unknown_model_is_an_openai_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="nope", input="x")
    error = info.value.body
    assert error["code"] == "model_not_found"
    assert "general" in error["message"] and "embedding" in error["message"]


def test_unknown_adapter_is_a_404_naming_it(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="general:ghost", messages=MESSAGES, max_tokens=2)
    assert info.value.body["code"] == "adapter_not_found"
    assert "ghost" in info.value.body["message"]


def test_max_tokens_above_the_bound_is_422(client: Any) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(
            model="general", messages=MESSAGES, max_tokens=MAX_NEW_TOKENS + 1
        )
    assert info.value.body["param"] == "max_tokens"
    assert str(MAX_NEW_TOKENS) in info.value.body["message"]


def test_too_many_or_too_long_inputs_are_413(live_server: Any) -> None:
    from mongars_llm.server import ServerConfig

    limit = ServerConfig().max_embedding_inputs
    url = f"{live_server.url}/v1/embeddings"
    many = httpx.post(url, json={"model": "embedding", "input": ["a"] * (limit + 1)})
    assert many.status_code == 413
    assert many.json()["error"]["code"] == "too_many_inputs"
    long_ids = httpx.post(url, json={"model": "embedding", "input": [[5] * 300]})
    assert long_ids.status_code == 413
    assert long_ids.json()["error"]["param"] == "input"
    # the runtime's own token limit (256 here) is reported the same way
    long_text = httpx.post(url, json={"model": "embedding", "input": "fox " * 400})
    assert long_text.status_code == 413, long_text.text
    assert long_text.json()["error"]["code"] == "input_too_long"


def test_validation_errors_are_openai_shaped(live_server: Any) -> None:
    response = httpx.post(
        f"{live_server.url}/v1/chat/completions",
        json={"model": "general", "messages": [], "temperature": 9},
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] in ("messages", "temperature")
    assert "messages" in error["message"] and "temperature" in error["message"]
    not_json = httpx.post(
        f"{live_server.url}/v1/embeddings",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 422
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.get(f"{live_server.url}/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"


def test_health_and_readiness(live_server: Any, runtime: Any) -> None:
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{live_server.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"] == runtime.model_id
