"""Packed embedding batches: short texts share rows, and each still gets the vector
it has when run alone (every pooling mode, causal and bidirectional, sdpa and eager)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongars_llm.runtime._embed_plan import plan_packed

from .conftest import runtime_settings

SHORT = [
    "Paris",
    "Where is my parcel?",
    "How long do refunds take?",
    "LoRA adapters fine-tune a large model by training small low-rank matrices.",
    "ok",
    "Question: what is two plus two? Answer: four.",
    "The quick brown fox jumps over the lazy dog.",
    "shipping",
]
INSTRUCTION = "Retrieve passages that answer the question"


@pytest.fixture(scope="module")
def unpacked(tiny_model_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    with UnifiedLLMRuntime.from_pretrained(
        tiny_model_dir, settings=runtime_settings(embed_pack_tokens=0)
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
def eager(tiny_model_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings()) as rt:
        rt.model.set_attn_implementation("eager")
        yield rt


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "pooling", ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]
)
def test_packed_vectors_equal_unpacked_ones(
    runtime: Any, unpacked: Any, eager: Any, events: Any, pooling: str, bidirectional: bool
) -> None:
    texts: list[Any] = [[INSTRUCTION, t] for t in SHORT[:4]] + SHORT[4:] + [[INSTRUCTION, ""]]
    options = {"pooling": pooling, "bidirectional": bidirectional}
    reference = unpacked.embed(texts, **options)
    for rt in (runtime, eager):
        got = rt.embed(texts, **options)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    plain, packed, packed_eager = events.named("llm_embed")
    assert plain["packed"] is False and packed["packed"] is True and packed_eager["packed"]
    assert packed["forward_batches"] == 1
    assert packed["padded_tokens"] < plain["padded_tokens"]


def test_packing_removes_the_padding_of_short_texts(
    runtime: Any, unpacked: Any, events: Any
) -> None:
    texts = [*SHORT, *(t.upper() for t in SHORT)]
    unpacked.embed(texts)
    runtime.embed(texts)
    plain, packed = events.named("llm_embed")
    assert plain["tokens"] == packed["tokens"]
    assert plain["padded_tokens"] > 1.5 * plain["tokens"]  # "ok" padded to the longest text
    assert packed["padded_tokens"] <= 1.1 * packed["tokens"]


def test_packed_concurrent_callers_get_their_own_vectors(runtime: Any, unpacked: Any) -> None:
    import asyncio

    async def main() -> list[Any]:
        return await asyncio.gather(*(runtime.aembed(t) for t in SHORT))

    got = np.vstack(asyncio.run(main()))
    np.testing.assert_allclose(got, unpacked.embed(SHORT), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_packing_matches_per_architecture(tmp_path: Path, architecture: str) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.testing import build_tiny_model

    path = build_tiny_model(tmp_path / architecture, architecture=architecture)  # type: ignore[arg-type]
    vectors = []
    for pack in (0, 256):
        with UnifiedLLMRuntime.from_pretrained(
            path, settings=runtime_settings(embed_pack_tokens=pack), bidirectional=True
        ) as rt:
            vectors.append(rt.embed(SHORT))
    np.testing.assert_allclose(vectors[1], vectors[0], rtol=1e-4, atol=1e-5)


def test_a_text_longer_than_the_sliding_window_is_not_packed(tmp_path: Path, events: Any) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.testing import build_tiny_model

    path = build_tiny_model(tmp_path / "mistral", architecture="mistral")
    with UnifiedLLMRuntime.from_pretrained(path, settings=runtime_settings()) as rt:
        rt.model.config.sliding_window = 8  # a window shorter than the longest text
        windowed = rt.embed(SHORT)
        (event,) = events.named("llm_embed")
        assert event["packed"] is False
        alone = np.vstack([rt.embed(t) for t in SHORT])
        np.testing.assert_allclose(windowed, alone, rtol=1e-4, atol=1e-5)


def test_batch_size_one_and_batch_invariant_never_pack(runtime: Any, events: Any) -> None:
    runtime.embed(SHORT, batch_size=1)
    runtime.embed(SHORT, batch_invariant=True)
    assert [e["packed"] for e in events.named("llm_embed")] == [False, False]
    assert [e["forward_batches"] for e in events.named("llm_embed")] == [len(SHORT)] * 2


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=80),
    batch_size=st.integers(1, 40),
    row_tokens=st.integers(1, 512),
    max_batch_tokens=st.integers(1, 4096),
)
def test_plan_packed_places_every_text_once_within_its_limits(
    lengths: list[int], batch_size: int, row_tokens: int, max_batch_tokens: int
) -> None:
    plan = plan_packed(
        lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens, row_tokens=row_tokens
    )
    placed = sorted(i for rows in plan for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    for rows in plan:
        assert sum(len(row) for row in rows) <= batch_size
        fills = [sum(lengths[i] for i in row) for row in rows]
        for row, fill in zip(rows, fills, strict=True):
            assert row and (fill <= row_tokens or len(row) == 1)
        assert len(rows) == 1 or len(rows) * max(fills) <= max_batch_tokens
