"""GradCache (``mini_batch_size``): a batch of negatives embedded in chunks gives the
gradient of the whole batch in one forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mongars_llm.errors import ConfigError
from mongars_llm.training import build_bundle
from mongars_llm.training._config import load_bundle_config
from mongars_llm.training._contrastive import backward_in_chunks, contrastive_batch
from mongars_llm.training._model import build_peft_model
from mongars_llm.training._pairs import PairExample
from mongars_llm.training._vectors import EmbeddingSpec, encode_texts


def _model(tiny_base: Path, *, lora_dropout: float) -> Any:
    from transformers import AutoModelForCausalLM

    config = load_bundle_config(
        base_model=str(tiny_base), objective="contrastive", lora_dropout=lora_dropout
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = build_peft_model(base, config)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a non-trivial gradient path
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    return model, config, EmbeddingSpec.of(config, model)


def _batch(make_pairs: Any) -> list[PairExample]:
    rows, _ = make_pairs(n_train=12, n_eval=0)
    return [PairExample(line=i, **row) for i, row in enumerate(rows)]


def _gradients(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_chunked_gradient_equals_the_whole_batch(
    tiny_base: Path, tiny_tokenizer: Any, make_pairs
) -> None:
    model, config, spec = _model(tiny_base, lora_dropout=0.0)
    objective = contrastive_batch(_batch(make_pairs), config, device="cpu")
    items, loss_of = objective.items, objective.loss
    assert len(items) == 36  # 12 queries, 12 positives, 12 hard negatives
    whole = loss_of(encode_texts(model, tiny_tokenizer, items, spec, device="cpu"))
    whole.backward()
    expected = _gradients(model)
    chunked = backward_in_chunks(model, tiny_tokenizer, items, spec, loss_of, chunk=5, device="cpu")
    got = _gradients(model)
    assert float(chunked) == pytest.approx(float(whole.detach()), rel=1e-5)
    assert set(got) == set(expected) and len(got) > 10
    for name, grad in expected.items():  # float rounding: chunks pad to other widths
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_the_second_pass_replays_the_dropout_masks(
    tiny_base: Path, tiny_tokenizer: Any, make_pairs
) -> None:
    """With dropout on, the recomputed chunk must see the masks of the first pass, or the
    gradient belongs to other vectors than the loss: one chunk equals the plain step."""
    model, config, spec = _model(tiny_base, lora_dropout=0.3)
    objective = contrastive_batch(_batch(make_pairs), config, device="cpu")
    items, loss_of = objective.items, objective.loss
    torch.manual_seed(1)
    plain = loss_of(encode_texts(model, tiny_tokenizer, items, spec, device="cpu"))
    plain.backward()
    expected = _gradients(model)
    torch.manual_seed(1)
    cached = backward_in_chunks(
        model, tiny_tokenizer, items, spec, loss_of, chunk=len(items), device="cpu"
    )
    got = _gradients(model)
    assert float(cached) == pytest.approx(float(plain), rel=1e-6)
    for name, grad in expected.items():  # float rounding: chunks pad to other widths
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    torch.manual_seed(2)  # and the masks do matter here: another draw, another gradient
    with torch.no_grad():
        other = loss_of(encode_texts(model, tiny_tokenizer, items, spec, device="cpu"))
    assert float(other) != pytest.approx(float(plain.detach()), rel=1e-6)


def test_a_chunked_run_trains_like_an_unchunked_one(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args, make_pairs
) -> None:
    train, _ = make_pairs(n_train=48, n_eval=0)
    data = jsonl(tmp_path / "pairs.jsonl", train)
    knobs = {
        "objective": "contrastive",
        "max_steps": 3,
        "lora_dropout": 0.0,
        "eval_fraction": 0.0,
        "register_adapter": False,
        "learning_rate": 3e-3,
    }
    whole = build_bundle(**bundle_args(tiny_base, data, tmp_path), run_name="whole", **knobs)
    chunked = build_bundle(
        **bundle_args(tiny_base, data, tmp_path), run_name="chunked", mini_batch_size=8, **knobs
    )
    assert [h["loss"] for h in chunked.history] == pytest.approx(
        [h["loss"] for h in whole.history], rel=1e-4
    )


def test_mini_batch_size_is_for_in_batch_negatives() -> None:
    with pytest.raises(ConfigError, match="mini_batch_size"):
        build_bundle(dataset_path="x.jsonl", objective="mntp", mini_batch_size=4)
