"""Server modes: API key, embeddings-only, lazy loading, load failure and fallback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from pydantic import SecretStr
from serving_support import make_settings

from mongars_llm.server import create_app

pytestmark = pytest.mark.serve

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fresh_shared_runtime() -> Iterator[None]:
    """The process-wide runtime is created by the app under test and closed after it."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    UnifiedLLMRuntime.reset_shared()
    yield
    UnifiedLLMRuntime.reset_shared()


def test_api_key_is_required_when_configured(
    serve: Any,
    tmp_path: Path,
    tiny_model_dir: Path,
    manifest_path: Path,
    runtime: Any,
    manager: Any,
) -> None:
    settings = make_settings(
        tmp_path, tiny_model_dir, manifest_path, api_key=SecretStr("sk-test-key-123")
    )
    with serve(create_app(settings, runtime, manager)) as server:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert "sk-test-key-123" not in str(info.value.body)
        missing = httpx.get(f"{server.url}/v1/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test-key-123", max_retries=0)
        assert right.embeddings.create(model="embedding", input="hi").data
        # health and readiness stay open for probes
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_embeddings_only_mode_serves_embeddings_and_refuses_chat(
    serve: Any, server_settings: Any, runtime: Any, manager: Any
) -> None:
    app = create_app(server_settings, runtime, manager, embeddings_only=True)
    with serve(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        vectors = client.embeddings.create(model="embedding", input=["a b", "c"])
        assert len(vectors.data) == 2
        for call in (
            lambda: client.chat.completions.create(model="general", messages=MESSAGES),
            lambda: client.completions.create(model="general", prompt="x"),
        ):
            with pytest.raises(openai.NotFoundError) as info:
                call()
            assert info.value.body["code"] == "embeddings_only"
            assert "embeddings-only" in info.value.body["message"]
        assert httpx.get(f"{server.url}/readyz").json()["embeddings_only"] is True


@pytest.mark.usefixtures("fresh_shared_runtime")
def test_lazy_loading_readiness_flips_once_loaded(
    serve: Any, server_settings: Any, manager: Any, runtime: Any
) -> None:
    app = create_app(server_settings, manager=manager)  # loads the shared runtime itself
    with serve(app) as server:
        first = httpx.get(f"{server.url}/readyz")
        assert first.status_code in (200, 503)
        if first.status_code == 503:
            assert first.json()["status"] == "loading"
            assert first.headers["retry-after"]
            chat = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "general", "messages": MESSAGES, "max_tokens": 2},
            )
            assert chat.status_code in (200, 503)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the runtime never became ready"
            time.sleep(0.2)
        body = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": "embedding", "input": "ready now"}
        ).json()
        np.testing.assert_allclose(
            body["data"][0]["embedding"], runtime.embed(["ready now"])[0], rtol=1e-5, atol=1e-6
        )


async def test_while_loading_every_model_name_is_a_503_not_a_404(
    server_settings: Any, manager: Any, tiny_model_dir: Path
) -> None:
    # no lifespan on this transport: the runtime never starts loading, so the app
    # stays in the state a request meets while the model loads
    app = create_app(server_settings, manager=manager)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        # the checkpoint id is only known once the model is loaded: no 404 before that
        for model in ("embedding", str(tiny_model_dir)):
            response = await client.post("/v1/embeddings", json={"model": model, "input": "x"})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "model_loading"
            assert response.headers["retry-after"]


@pytest.mark.usefixtures("fresh_shared_runtime")
def test_load_failure_gives_structured_errors_or_the_fallback(
    serve: Any, tmp_path: Path, manifest_path: Path, manager: Any
) -> None:
    missing = tmp_path / "no-such-checkpoint"
    plain = make_settings(tmp_path, missing, manifest_path)
    with serve(create_app(plain, manager=manager)) as server:
        deadline = time.monotonic() + 60
        while True:
            ready = httpx.get(f"{server.url}/readyz")
            if ready.json()["status"] == "failed":
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ready.status_code == 503
        assert str(missing) in ready.json()["detail"]
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "general", "messages": MESSAGES},
        )
        assert chat.status_code == 503
        assert chat.json()["error"]["code"] == "load_failed"
        # the checkpoint id is never known after a failed load: the load error, not a 404
        embed = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": str(missing), "input": "x"}
        )
        assert embed.status_code == 503, embed.text
        assert embed.json()["error"]["code"] == "load_failed"

    fallback = make_settings(
        tmp_path, missing, manifest_path, fallback_reply="The assistant is unavailable."
    )
    with serve(create_app(fallback, manager=manager)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/readyz").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        raw = client.chat.completions.with_raw_response.create(model="general", messages=MESSAGES)
        reply = raw.parse()
        assert reply.choices[0].message.content == "The assistant is unavailable."
        assert raw.headers["x-mongars-fallback"] == "load_failed"
        assert raw.headers["cache-control"] == "no-store"
        streamed = client.chat.completions.create(model="general", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == "The assistant is unavailable."
        # client errors are never papered over, and embeddings never get a fake vector
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as info:
            client.embeddings.create(model="embedding", input="x")
        assert info.value.status_code == 503
