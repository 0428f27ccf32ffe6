"""The official ``ollama`` client against ``serve`` on the real model (SmolLM2-135M):
chat, streamed chat, generate, embed, list, ps and show through Ollama's API, built as
``mongars-llm serve`` builds it (the ``smol`` profile, loaded in the background)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

ollama = pytest.importorskip("ollama")

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.serve]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


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
        # the torch engine on the converted folder: its greedy answers are pinned here (the
        # llama.cpp engine has tests of its own, tests/server/test_real_openai_llamacpp.py)
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
def oc(real_server: Any) -> Any:
    return ollama.Client(host=real_server.url, timeout=300)


def test_chat_stream_and_generate_answer_paris(oc: Any) -> None:
    reply = oc.chat(model="general", messages=QUESTION, options=GREEDY)
    assert "Paris" in reply.message.content
    assert reply.done and reply.done_reason == "stop"  # ended at <|im_end|>
    assert "<|im_end|>" not in reply.message.content
    assert reply.prompt_eval_count > 20 and 0 < reply.eval_count <= 24
    parts = list(oc.chat(model="general", messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert parts[-1].done and parts[-1].eval_count == reply.eval_count
    generated = oc.generate(model="general", prompt=QUESTION[0]["content"], options=GREEDY)
    assert generated.response == reply.message.content


def test_embed_ranks_a_related_sentence_first(oc: Any) -> None:
    texts = [
        "How do I bake bread at home?",
        "What is a good recipe for a loaf of bread?",
        "The train to Berlin leaves at noon.",
    ]
    vectors = np.array(oc.embed(model="embedding", input=texts).embeddings)
    assert vectors.shape == (3, 576)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.05, sims


def test_list_ps_show(oc: Any, real_server: Any) -> None:
    assert {"general", "coding", "embedding"} <= {m.model for m in oc.list().models}
    resident = httpx.get(f"{real_server.url}/api/ps", timeout=30).json()["models"]
    general = next(m for m in resident if m["name"] == "general")
    assert general["engine"] in ("torch", "llama.cpp") and general["size"] > 0
    assert {m.model for m in oc.ps().models} >= {"general", "embedding"}
    shown = oc.show("general")
    assert shown.modelinfo["llama.embedding_length"] == 576
    assert "completion" in shown.capabilities


def test_unknown_model_is_an_ollama_error(oc: Any) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        oc.chat(model="llama3", messages=QUESTION)
    assert caught.value.status_code == 404 and "llama3" in caught.value.error
