"""``matryoshka_dims`` (``--matryoshka-dims``): the contrastive loss summed over
truncations of the vectors, recorded where the runtime and the server read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle
from mongars_llm.training._config import load_bundle_config
from mongars_llm.training._contrastive import contrastive_batch, info_nce
from mongars_llm.training._pairs import PairExample

PAIRS = [
    PairExample(line=i + 1, query=f"query {i}", positive=f"passage number {i}") for i in range(4)
]


def test_the_loss_is_summed_over_the_truncations(tiny_base: Path) -> None:
    plain = load_bundle_config(base_model=str(tiny_base), objective="contrastive")
    nested = load_bundle_config(
        base_model=str(tiny_base), objective="contrastive", matryoshka_dims=[16, 8, 16]
    )
    assert nested.matryoshka_dims == [8, 16]  # sorted, once each
    vectors = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    full = contrastive_batch(PAIRS, plain, device="cpu").loss(vectors)
    summed = contrastive_batch(PAIRS, nested, device="cpu").loss(vectors)

    def at(size: int) -> torch.Tensor:
        return info_nce(vectors[:4, :size], vectors[4:, :size], temperature=plain.temperature)

    assert float(full) == pytest.approx(float(at(64)), rel=1e-6)
    assert float(summed) == pytest.approx(float(at(64) + at(8) + at(16)), rel=1e-6)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"objective": "sft", "matryoshka_dims": [8]}, "contrastive and simcse"),
        ({"objective": "contrastive", "matryoshka_dims": [0, 8]}, "dimensions >= 1"),
        ({"objective": "contrastive", "matryoshka_dims": []}, "dimensions >= 1"),
    ],
)
def test_bad_matryoshka_dims_are_refused(
    tiny_base: Path, knobs: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=message) as caught:
        load_bundle_config(base_model=str(tiny_base), **knobs)
    assert "matryoshka_dims" in str(caught.value)


def test_a_matryoshka_run_records_its_dimensions_and_serves_them(
    tmp_path: Path, tiny_base: Path, bundle_args: Any, make_pairs: Any
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    train, evals = make_pairs()
    data, eval_data = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in evals))
    result = build_bundle(
        **bundle_args(tiny_base, data, tmp_path),
        eval_dataset_path=eval_data,
        objective="contrastive",
        run_name="mrl",
        max_steps=2,
        matryoshka_dims=[8, 16],
    )
    config = json.loads((result.adapter_dir / "llm2vec_config.json").read_text())
    assert config["matryoshka_dims"] == [8, 16]
    entry = AdapterRegistry(result.config.registry_path).get(result.registry_entry.version)
    assert entry.embedding is not None and entry.embedding["matryoshka_dims"] == [8, 16]
    with UnifiedLLMRuntime.from_pretrained(tiny_base, device="cpu", dtype="float32") as rt:
        rt.load_adapter("mrl", result.adapter_dir, use="embed")
        assert rt.trained_dimensions() == (8, 16)
        assert rt.embed(["a text"], dimensions=16).shape == (1, 16)


def test_too_wide_a_truncation_is_refused_before_training(
    tmp_path: Path, tiny_base: Path, bundle_args: Any, make_pairs: Any
) -> None:
    from mongars_llm.errors import BundleError

    train, _ = make_pairs()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    with pytest.raises(BundleError, match="smaller than the model's 64 dimensions"):
        build_bundle(
            **bundle_args(tiny_base, data, tmp_path),
            objective="contrastive",
            max_steps=1,
            eval_fraction=0.0,
            matryoshka_dims=[8, 64],
        )
