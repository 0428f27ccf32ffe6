"""LoRA adapters: several on one base, chosen per call, embedding-only ones keep chat exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import LLMRuntimeError

from .conftest import runtime_settings

PROMPT = [{"role": "user", "content": "Paris is the capital of"}]
TEXTS = ["The quick brown fox", ["Retrieve passages", "capital of France"]]


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path, lora_dirs: dict[str, Path]) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir,
        settings=runtime_settings(),
        adapters=[
            ("chat", lora_dirs["chat"], "all"),
            ("retrieval", lora_dirs["retrieval"], "embed"),
        ],
    )
    yield rt
    rt.close()


def test_adapters_are_chosen_per_call(runtime: Any, adapted: Any) -> None:
    base_reply = runtime.generate(PROMPT, temperature=0, max_new_tokens=16).text
    base_vectors = runtime.embed(TEXTS)
    assert adapted.adapter_names == ["chat", "retrieval"]
    # no adapter at all: exactly the base model
    assert adapted.generate(PROMPT, temperature=0, max_new_tokens=16, adapter=[]).text == base_reply
    np.testing.assert_allclose(adapted.embed(TEXTS, adapter=[]), base_vectors, atol=1e-6)
    # defaults: "chat" (use=all) for generation, chat + retrieval for embeddings
    default_reply = adapted.generate(PROMPT, temperature=0, max_new_tokens=16).text
    assert default_reply != base_reply
    assert adapted.generate(PROMPT, temperature=0, max_new_tokens=16, adapter="chat").text == (
        default_reply
    )
    stacked = adapted.embed(TEXTS)
    np.testing.assert_allclose(
        stacked, adapted.embed(TEXTS, adapter=["chat", "retrieval"]), atol=1e-6
    )
    only_retrieval = adapted.embed(TEXTS, adapter="retrieval")
    for a, b in (
        (stacked, base_vectors),
        (only_retrieval, base_vectors),
        (stacked, only_retrieval),
    ):
        assert not np.allclose(a, b, atol=1e-4)


def test_embedding_only_adapters_keep_chat_exact(
    runtime: Any, tiny_model_dir: Path, lora_dirs: dict[str, Path]
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    base_reply = runtime.generate(PROMPT, temperature=0, max_new_tokens=24)
    base_vectors = runtime.embed(TEXTS)
    weights_before = runtime.model.model.layers[0].self_attn.q_proj.weight
    with UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir,
        settings=runtime_settings(),
        adapters=[("retrieval", lora_dirs["retrieval"], "embed")],
    ) as rt:
        assert rt.generate(PROMPT, temperature=0, max_new_tokens=24) == base_reply
        assert not np.allclose(rt.embed(TEXTS), base_vectors, atol=1e-4)
        # the LoRA wraps the original layer: the base weight is the very same tensor storage
        layer = rt.model.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.shape == weights_before.shape
        assert {p.data_ptr() for p in rt.decoder.parameters()} <= {
            p.data_ptr() for p in rt.model.parameters()
        }
        rt.unload_adapter("retrieval")
        assert rt.adapter_names == []
        np.testing.assert_allclose(rt.embed(TEXTS), base_vectors, atol=1e-6)


def test_adapter_errors(adapted: Any, tmp_path: Path) -> None:
    with pytest.raises(LLMRuntimeError) as info:
        adapted.embed("x", adapter="nope")
    assert info.value.code == "adapter_not_found" and "chat, retrieval" in str(info.value)
    with pytest.raises(LLMRuntimeError) as info:
        adapted.unload_adapter("nope")
    assert info.value.code == "adapter_not_found"
    with pytest.raises(LLMRuntimeError) as info:
        adapted.load_adapter("broken", tmp_path)
    assert info.value.code == "load_failed" and "adapter_config.json" in str(info.value)
    with pytest.raises(LLMRuntimeError) as info:
        adapted.load_adapter("x", tmp_path, use="sometimes")
    assert info.value.code == "invalid_input"
    assert adapted.adapter_names == ["chat", "retrieval"]
