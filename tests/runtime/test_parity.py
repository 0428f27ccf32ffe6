"""Parity with the real ``llm2vec`` package (0.2.3), from the committed fixture.

``nox -s parity`` regenerates tests/fixtures/llm2vec_parity in a venv with
llm2vec 0.2.3 + transformers 4.44.2 (benchmarks/_llm2vec_reference.py): a tiny
Llama saved by transformers 4.44, the published LLM2Vec layout (MNTP LoRA +
supervised LoRA) and ``LLM2Vec.encode`` vectors for plain texts,
``[instruction, text]`` pairs, every pooling mode and bidirectional on/off.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import runtime_settings

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llm2vec_parity"
META = json.loads((FIXTURE / "cases.json").read_text())
VECTORS = np.load(FIXTURE / "vectors.npz")
CASES = META["cases"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def base() -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(FIXTURE / "model", settings=runtime_settings())
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def layout() -> Iterator[Any]:
    """The published LLM2Vec layout: the MNTP directory + the supervised adapter."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        FIXTURE / "mntp",
        settings=runtime_settings(),
        pooling=None,
        bidirectional=None,
        adapters=[("supervised", FIXTURE / "supervised", "embed")],
    )
    yield rt
    rt.close()


def test_fixture_covers_every_mode() -> None:
    assert META["llm2vec"] == "0.2.3" and META["transformers"] == "4.44.2"
    combos = {(c["pooling"], c["bidirectional"]) for c in CASES if c["layout"] == "base"}
    pooling = {"mean", "weighted_mean", "eos_token", "last_token", "bos_token"}
    assert combos == {(p, b) for p in pooling for b in (False, True)}
    assert any(isinstance(c["inputs"][0], list) for c in CASES)
    # bidirectional vectors really differ from causal ones, so both are meaningful
    assert cosine(VECTORS["texts-mean-bi"], VECTORS["texts-mean-causal"]).min() < 0.9


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["layout"] == "base"], ids=lambda c: c["name"]
)
def test_embed_matches_llm2vec_encode(base: Any, case: dict[str, Any]) -> None:
    got = base.embed(
        case["inputs"],
        pooling=case["pooling"],
        bidirectional=case["bidirectional"],
        normalize=False,
    )
    reference = VECTORS[case["name"]]
    assert got.shape == reference.shape
    assert cosine(got, reference).min() >= 0.9999


@pytest.mark.parametrize(
    "case", [c for c in CASES if c["layout"] == "llm2vec"], ids=lambda c: c["name"]
)
def test_published_layout_matches_llm2vec(layout: Any, base: Any, case: dict[str, Any]) -> None:
    assert layout.adapter_names == ["mntp", "supervised"]
    assert layout.bidirectional is True and layout.pooling == "mean"  # llm2vec_config.json
    got = layout.embed(case["inputs"], normalize=False)
    assert cosine(got, VECTORS[case["name"]]).min() >= 0.9999
    # the adapters are for embeddings only: chat on the layout is the exact base model
    prompt = "The quick brown fox"
    assert layout.generate(prompt, temperature=0, max_new_tokens=8) == base.generate(
        prompt, temperature=0, max_new_tokens=8
    )
