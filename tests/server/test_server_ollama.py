"""The Ollama-compatible routes, driven by the official ``ollama`` client over loopback
HTTP on the tiny model: the same answers as the OpenAI routes (one runtime), Ollama's
response fields and error shape, auth, and ``keep_alive`` unloading adapters."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from serving_support import MAX_NEW_TOKENS

ollama = pytest.importorskip("ollama")

QUESTION = [{"role": "user", "content": "which adapter answers?"}]
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture
def oc(live_server: Any) -> Any:
    return ollama.Client(host=live_server.url, timeout=120)


def openai_reply(live_server: Any, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_chat_matches_the_openai_route_and_has_ollama_fields(oc: Any, live_server: Any) -> None:
    reply = oc.chat(model="general", messages=QUESTION, stream=False, options=GREEDY)
    same = openai_reply(
        live_server, model="general", messages=QUESTION, temperature=0, max_tokens=6
    )
    assert reply.message.role == "assistant"
    assert reply.message.content == same["choices"][0]["message"]["content"]
    assert reply.model == "general"
    assert reply.done is True
    assert reply.done_reason == same["choices"][0]["finish_reason"]
    assert reply.eval_count == same["usage"]["completion_tokens"] <= 6
    assert reply.prompt_eval_count == same["usage"]["prompt_tokens"] > 0
    assert reply.total_duration >= reply.eval_duration > 0
    created = dt.datetime.fromisoformat(reply.created_at.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 120


def test_streamed_chat_is_ndjson_parts_then_a_done_line(oc: Any) -> None:
    whole = oc.chat(model="general", messages=QUESTION, stream=False, options=GREEDY)
    parts = list(oc.chat(model="general", messages=QUESTION, stream=True, options=GREEDY))
    assert len(parts) >= 2
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    assert last.done is True and last.done_reason == whole.done_reason
    assert last.eval_count == whole.eval_count
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_stream_content_type_is_ndjson(live_server: Any) -> None:
    with httpx.stream(
        "POST",
        f"{live_server.url}/api/chat",
        json={"model": "general", "messages": QUESTION, "options": GREEDY},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1].startswith("{") and '"done": true' in lines[-1]


def test_generate_applies_the_chat_template_and_raw_does_not(oc: Any, live_server: Any) -> None:
    generated = oc.generate(model="general", prompt=QUESTION[0]["content"], options=GREEDY)
    chat = oc.chat(model="general", messages=QUESTION, stream=False, options=GREEDY)
    assert generated.response == chat.message.content
    assert generated.done is True and generated.eval_count == chat.eval_count
    raw = oc.generate(model="general", prompt="The sky is", raw=True, options=GREEDY)
    completion = httpx.post(
        f"{live_server.url}/v1/completions",
        json={"model": "general", "prompt": "The sky is", "temperature": 0, "max_tokens": 6},
        timeout=120,
    ).json()
    assert raw.response == completion["choices"][0]["text"]
    streamed = list(
        oc.generate(model="general", prompt=QUESTION[0]["content"], options=GREEDY, stream=True)
    )
    assert "".join(p.response for p in streamed) == generated.response
    assert streamed[-1].done is True


def test_options_map_onto_sampling(oc: Any) -> None:
    long = oc.chat(model="general", messages=QUESTION, stream=False, options={"temperature": 0})
    assert long.eval_count == MAX_NEW_TOKENS  # no num_predict: the server's bound
    short = oc.chat(
        model="general",
        messages=QUESTION,
        stream=False,
        options={"temperature": 0, "num_predict": 2, "num_ctx": 4096, "repeat_penalty": 1.1},
    )
    assert short.eval_count == 2 and short.done_reason == "length"
    seeded = [
        oc.chat(
            model="general",
            messages=QUESTION,
            stream=False,
            options={"temperature": 1.0, "seed": 7, "top_k": 20, "top_p": 0.9, "num_predict": 6},
        ).message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_embed_matches_the_openai_route(oc: Any, live_server: Any) -> None:
    texts = ["first text", "a second, longer text"]
    result = oc.embed(model="embedding", input=texts)
    reference = httpx.post(
        f"{live_server.url}/v1/embeddings",
        json={"model": "embedding", "input": texts},
        timeout=120,
    ).json()
    expected = np.array([d["embedding"] for d in reference["data"]])
    assert np.allclose(np.array(result.embeddings), expected, atol=1e-5)
    assert result.prompt_eval_count == reference["usage"]["prompt_tokens"]
    single = oc.embed(model="embedding", input="first text")
    assert np.allclose(single.embeddings[0], expected[0], atol=1e-5)
    older = oc.embeddings(model="embedding", prompt="first text")
    assert np.allclose(older.embedding, expected[0], atol=1e-5)


def test_list_ps_show_version(oc: Any, live_server: Any) -> None:
    names = [m.model for m in oc.list().models]
    assert names[:2] == ["general", "embedding"]
    running = oc.ps().models
    assert {m.model for m in running} >= {"general", "embedding"}
    raw = httpx.get(f"{live_server.url}/api/ps", timeout=30).json()["models"][0]
    assert raw["engine"] == "torch" and raw["role"] == "general" and raw["size"] > 0
    shown = oc.show("general")
    assert "completion" in shown.capabilities and "embedding" in shown.capabilities
    assert shown.modelinfo["general.parameter_count"] > 0
    version = httpx.get(f"{live_server.url}/api/version", timeout=30).json()["version"]
    from mongars_llm import __version__

    assert version == __version__


def test_role_latest_is_the_role(oc: Any) -> None:
    reply = oc.chat(model="general:latest", messages=QUESTION, stream=False, options=GREEDY)
    assert reply.done is True


def test_load_request_without_messages(oc: Any) -> None:
    reply = oc.chat(model="general", messages=[], stream=False)
    assert reply.done is True and reply.done_reason == "load"
    assert reply.message.content == ""


@pytest.mark.parametrize(
    ("request_args", "status", "words"),
    [
        ({"model": "nope"}, 404, ["'nope'", "general", "GET /api/tags"]),
        ({"model": "general:missing"}, 404, ["missing"]),
        ({"options": {"temperature": 9}}, 400, ["options.temperature"]),
        ({"options": {"num_predict": 10_000}}, 422, ["options.num_predict", "limit"]),
        ({"format": "json"}, 400, ["format", "JSON"]),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, ["tools"]),
        ({"keep_alive": "soon"}, 400, ["keep_alive", "5m"]),
    ],
)
def test_errors_are_ollama_shaped(
    oc: Any, request_args: dict[str, Any], status: int, words: list[str]
) -> None:
    args = {"model": "general", "messages": QUESTION, "stream": False, **request_args}
    with pytest.raises(ollama.ResponseError) as caught:
        oc.chat(**args)
    assert caught.value.status_code == status
    assert isinstance(caught.value.error, str)
    for word in words:
        assert word in caught.value.error


def test_error_body_is_a_plain_string(live_server: Any) -> None:
    response = httpx.post(f"{live_server.url}/api/chat", json={"messages": QUESTION}, timeout=30)
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["error"], str) and "model" in body["error"]
    # the OpenAI routes keep their own shape
    other = httpx.post(f"{live_server.url}/v1/chat/completions", json={}, timeout=30).json()
    assert isinstance(other["error"], dict)


def test_api_key_guards_the_ollama_routes(
    server_settings: Any,
    runtime: Any,
    manager: Any,
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    from mongars_llm.server import create_app

    key = "k-3b8d1f0e-secret"
    settings = server_settings.model_copy(update={"api_key": SecretStr(key)})
    with serve(create_app(settings, runtime, manager)) as server:
        anonymous = ollama.Client(host=server.url, timeout=60)
        for call in (
            lambda: anonymous.list(),
            lambda: anonymous.chat(model="general", messages=QUESTION),
        ):
            with pytest.raises(ollama.ResponseError) as caught:
                call()
            assert caught.value.status_code == 401
            assert "API key" in caught.value.error and key not in caught.value.error
        keyed = ollama.Client(
            host=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        )
        assert keyed.chat(model="general", messages=QUESTION, options=GREEDY).done
        assert httpx.get(f"{server.url}/api/version", timeout=30).status_code == 200


def test_embeddings_only_server_has_no_chat(
    server_settings: Any,
    runtime: Any,
    manager: Any,
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    from mongars_llm.server import create_app

    with serve(create_app(server_settings, runtime, manager, embeddings_only=True)) as server:
        client = ollama.Client(host=server.url, timeout=60)
        assert len(client.embed(model="embedding", input="x").embeddings) == 1
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="general", messages=QUESTION)
        assert caught.value.status_code == 404


# --------------------------------------------------------------------- keep_alive


def _wait(predicate: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_keep_alive_unloads_an_idle_adapter_and_reloads_it(
    server_settings: Any,
    private_runtime: Any,
    manager: Any,
    adapters: list[Path],
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    from mongars_llm.server import ServerConfig, create_app

    private_runtime.load_adapter("a1", adapters[0], use="explicit")
    app = create_app(
        server_settings, private_runtime, manager, config=ServerConfig(keep_alive_s=3600)
    )
    with serve(app) as server:
        client = ollama.Client(host=server.url, timeout=120)
        first = client.chat(model="general:a1", messages=QUESTION, options=GREEDY).message.content
        base = client.chat(model="general", messages=QUESTION, options=GREEDY).message.content
        assert first != base  # the adapter changes the answer

        resident = {m.model: m for m in client.ps().models}
        expires = resident["general:a1"].expires_at
        remaining = (expires - dt.datetime.now(dt.UTC)).total_seconds()
        assert 3000 < remaining <= 3600  # the server's default keep-alive

        client.chat(model="general:a1", messages=QUESTION, options=GREEDY, keep_alive="10m")
        expires = {m.model: m for m in client.ps().models}["general:a1"].expires_at
        assert 500 < (expires - dt.datetime.now(dt.UTC)).total_seconds() <= 600

        # keep_alive=0: unloaded right after the request (Ollama's "unload now")
        client.chat(model="general:a1", messages=QUESTION, options=GREEDY, keep_alive=0)
        assert _wait(lambda: "a1" not in private_runtime.adapter_names)
        assert "general:a1" not in {m.model for m in client.ps().models}
        assert "general:a1" in {m.model for m in client.list().models}  # still selectable

        # the next request loads it again and gets the adapter's answer
        again = client.chat(model="general:a1", messages=QUESTION, options=GREEDY)
        assert again.message.content == first
        assert "a1" in private_runtime.adapter_names
        assert again.load_duration > 0


def test_keep_alive_default_times_out_idle_adapters(
    server_settings: Any,
    private_runtime: Any,
    manager: Any,
    adapters: list[Path],
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    from mongars_llm.server import ServerConfig, create_app

    private_runtime.load_adapter("a2", adapters[1], use="all")  # a default adapter
    app = create_app(
        server_settings, private_runtime, manager, config=ServerConfig(keep_alive_s=0.3)
    )
    with serve(app) as server:
        client = ollama.Client(host=server.url, timeout=120)
        with_adapter = client.chat(model="general", messages=QUESTION, options=GREEDY)
        assert _wait(lambda: "a2" not in private_runtime.adapter_names)
        # a request relying on the default adapter loads it again first: same answer
        again = client.chat(model="general", messages=QUESTION, options=GREEDY)
        assert again.message.content == with_adapter.message.content
        # the OpenAI route too
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "general", "messages": QUESTION, "temperature": 0, "max_tokens": 6},
            timeout=120,
        ).json()
        assert reply["choices"][0]["message"]["content"] == with_adapter.message.content


def test_parse_keep_alive() -> None:
    from mongars_llm.server._keep_alive import parse_keep_alive

    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("-1") == -1
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(None) is None
