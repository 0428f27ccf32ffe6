"""Parity with the real ``llm2vec`` package (0.2.3), from the committed fixture.

``nox -s parity`` regenerates tests/fixtures/llm2vec_parity in a venv with
llm2vec 0.2.3 + transformers 4.44.2 (benchmarks/_llm2vec_reference.py): two tiny
Llamas saved by transformers 4.44, one with a Llama-2-style tokenizer (``model/``)
and one with a byte-level BPE without a prefix space (``bpe/``), where a text
after an instruction has other tokens than the text alone; the published LLM2Vec
layout (MNTP LoRA + supervised LoRA); and, for plain texts and
``[instruction, text]`` pairs, every pooling mode and bidirectional on/off, the
``LLM2Vec.encode`` vectors and the token ids llm2vec reads and pools.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.runtime import POOLING_MODES

from .conftest import runtime_settings

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llm2vec_parity"
META = json.loads((FIXTURE / "cases.json").read_text())
VECTORS = np.load(FIXTURE / "vectors.npz")
CASES = META["cases"]
MODELS = {"base": "model", "bpe": "bpe"}
PACKING = {"packed": 256, "unpacked": 0}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def by_layout(*layouts: str) -> list[dict[str, Any]]:
    return [c for c in CASES if c["layout"] in layouts]


@pytest.fixture(scope="module")
def runtimes() -> Iterator[dict[tuple[str, str], Any]]:
    """A runtime per fixture model, packing short inputs into shared rows or not."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    out = {
        (layout, packing): UnifiedLLMRuntime.from_pretrained(
            FIXTURE / folder, settings=runtime_settings(embed_pack_tokens=pack)
        )
        for layout, folder in MODELS.items()
        for packing, pack in PACKING.items()
    }
    yield out
    for rt in out.values():
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


def encode(rt: Any, case: dict[str, Any], **options: Any) -> list[Any]:
    """The runtime's tokenisation of a case (the LLM2Vec core, as ``embed`` calls it)."""
    from mongars_llm.runtime._llm2vec import encode_inputs, normalise_inputs

    return encode_inputs(
        rt.tokenizer,
        normalise_inputs(case["inputs"], None),
        pooling=case["pooling"],
        max_length=rt.max_length,
        model_type=rt.model.config.model_type,
        **options,
    )


def test_fixture_covers_every_mode() -> None:
    assert META["llm2vec"] == "0.2.3" and META["transformers"] == "4.44.2"
    for name in MODELS:
        combos = {(c["pooling"], c["bidirectional"]) for c in by_layout(name)}
        assert combos == {(p, b) for p in POOLING_MODES for b in (False, True)}, name
        assert any(isinstance(c["inputs"][0], list) for c in by_layout(name))
    # bidirectional vectors really differ from causal ones, so both are meaningful
    assert cosine(VECTORS["texts-mean-bi"], VECTORS["texts-mean-causal"]).min() < 0.9
    # the byte-level pairs really have other tokens in context than alone
    assert len(META["bpe_span_differs"]) >= 5


@pytest.mark.parametrize("case", by_layout("base", "bpe", "llm2vec"), ids=lambda c: c["name"])
def test_tokens_and_pooled_span_are_llm2vecs(runtimes: Any, case: dict[str, Any]) -> None:
    rt = runtimes["bpe" if case["layout"] == "bpe" else "base", "packed"]
    encoded = encode(rt, case)
    assert [e.ids for e in encoded] == [t["ids"] for t in case["llm2vec_tokens"]]
    assert [sum(e.pooled) for e in encoded] == [t["pooled"] for t in case["llm2vec_tokens"]]
    assert all(e.pooled == sorted(e.pooled) for e in encoded)  # the last N tokens


@pytest.mark.parametrize("packing", list(PACKING))
@pytest.mark.parametrize("case", by_layout("base", "bpe"), ids=lambda c: c["name"])
def test_embed_matches_llm2vec_encode(runtimes: Any, case: dict[str, Any], packing: str) -> None:
    rt = runtimes[case["layout"], packing]
    got = rt.embed(
        case["inputs"],
        pooling=case["pooling"],
        bidirectional=case["bidirectional"],
        normalize=False,
    )
    reference = VECTORS[case["name"]]
    assert got.shape == reference.shape
    assert cosine(got, reference).min() >= 0.99999


@pytest.mark.parametrize(
    "case",
    [c for c in by_layout("bpe") if c["pooling"] in ("mean", "weighted_mean")],
    ids=lambda c: c["name"],
)
def test_character_offset_spans_miss_llm2vec_where_counts_differ(
    runtimes: Any, case: dict[str, Any]
) -> None:
    """The rule the runtime used before: the tokens whose characters lie in the text."""
    from mongars_llm.runtime._llm2vec import embed_padded

    rt = runtimes["bpe", "unpacked"]
    reference = VECTORS[case["name"]]
    options = {
        "pooling": case["pooling"],
        "bidirectional": case["bidirectional"],
        "pad_id": rt.tokenizer.pad_token_id,
        "bos_token_id": rt.tokenizer.bos_token_id,
    }
    offsets = embed_padded(rt.decoder, encode(rt, case, span="offsets"), **options).numpy()
    counted = embed_padded(rt.decoder, encode(rt, case), **options).numpy()
    assert cosine(counted, reference).min() >= 0.99999
    differs = [
        isinstance(item, list) and item[1] in META["bpe_span_differs"] for item in case["inputs"]
    ]
    agreement = cosine(offsets, reference)
    if any(differs):
        assert agreement[np.array(differs)].max() < 0.9999, agreement
    assert (agreement[~np.array(differs)] >= 0.99999).all(), agreement


@pytest.mark.parametrize("case", by_layout("llm2vec"), ids=lambda c: c["name"])
def test_published_layout_matches_llm2vec(layout: Any, runtimes: Any, case: dict[str, Any]) -> None:
    base = runtimes["base", "packed"]
    assert layout.adapter_names == ["mntp", "supervised"]
    assert layout.bidirectional is True and layout.pooling == "mean"  # llm2vec_config.json
    got = layout.embed(case["inputs"], normalize=False)
    assert cosine(got, VECTORS[case["name"]]).min() >= 0.99999
    # the adapters are for embeddings only: chat on the layout is the exact base model
    prompt = "The quick brown fox"
    assert layout.generate(prompt, temperature=0, max_new_tokens=8) == base.generate(
        prompt, temperature=0, max_new_tokens=8
    )
