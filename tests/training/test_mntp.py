"""MNTP (LLM2Vec's first step) and stacking a contrastive adapter on top of it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import ConfigError, DatasetError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle
from mongars_llm.training._mntp import Masker, mask_token_id


# ------------------------------------------------------------------------ masking
@pytest.fixture(scope="module")
def masker(tiny_tokenizer: Any) -> Masker:
    return Masker(tiny_tokenizer, probability=0.2, max_length=64, seed=7)


def test_masking_is_reproducible_and_follows_bert_recipe(masker: Masker, tiny_tokenizer) -> None:
    import torch

    rows = masker.encode(["the quick brown fox jumps over the lazy dog " * 4] * 64)
    first = masker.mask(rows, 3, 0, device="cpu")
    again = masker.mask(rows, 3, 0, device="cpu")
    other = masker.mask(rows, 4, 0, device="cpu")
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.labels, other.labels)  # another step, another choice

    original = torch.tensor(rows)
    chosen = first.labels != -100
    assert torch.equal(first.labels[chosen], original[chosen])  # labels are the true tokens
    assert not chosen[:, 0].any()  # the first token has no previous position
    special = torch.isin(original, torch.tensor(tiny_tokenizer.all_special_ids))
    assert not (chosen & special).any()
    share = chosen.sum().item() / (~special).sum().item()
    assert 0.15 < share < 0.25
    masked = (first.input_ids == masker.mask_id) & chosen
    kept = (first.input_ids == original) & chosen
    assert 0.7 < masked.sum().item() / chosen.sum().item() < 0.9
    assert 0.05 < kept.sum().item() / chosen.sum().item() < 0.2
    assert torch.equal(first.input_ids[~chosen], original[~chosen])


def test_mask_token_falls_back_to_llm2vecs_blank(tiny_tokenizer: Any) -> None:
    assert tiny_tokenizer.mask_token_id is None
    blank = tiny_tokenizer.convert_tokens_to_ids("_")
    expected = blank if blank != tiny_tokenizer.unk_token_id else tiny_tokenizer.unk_token_id
    if expected is None:
        expected = tiny_tokenizer.eos_token_id
    assert mask_token_id(tiny_tokenizer) == expected


# ------------------------------------------------------------------------ training
def _texts(make_pairs: Any) -> list[dict[str, str]]:
    train, _ = make_pairs(n_train=64, n_eval=0)
    return [{"text": r["positive"]} for r in train] + [{"text": r["query"]} for r in train]


@pytest.fixture(scope="module")
def mntp(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, bundle_args, make_pairs) -> Any:
    root = tmp_path_factory.mktemp("mntp")
    _, evals = make_pairs(n_train=64, n_eval=16)
    data, eval_data = root / "texts.jsonl", root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _texts(make_pairs)))
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in evals))
    return build_bundle(
        **bundle_args(tiny_base, data, root),
        eval_dataset_path=eval_data,  # pairs: retrieval metrics of the bidirectional model
        objective="mntp",
        run_name="mntp",
        adapter_name="mntp",
        max_steps=12,
        learning_rate=3e-3,
    )


def test_mntp_learns_to_predict_masked_tokens_bidirectionally(mntp: Any) -> None:
    metrics = mntp.metrics
    assert mntp.config.bidirectional is True  # mntp's default
    assert metrics["eval_texts"] == 13 and metrics["train_examples"] == 115
    base, trained = metrics["mntp_base"], metrics["mntp"]
    assert trained["mntp_loss"] < base["mntp_loss"] - 1.0, (base, trained)
    assert trained["mntp_accuracy"] > base["mntp_accuracy"]
    assert metrics["retrieval"]["queries"] == 16 and metrics["retrieval_base"]["queries"] == 16
    assert all(h["masked_tokens"] > 0 for h in mntp.history)
    entry = mntp.registry_entry
    assert entry.use == "embed" and entry.objective == "mntp"
    assert entry.embedding["bidirectional"] is True and entry.embedding["mask_probability"] == 0.2
    assert entry.metrics["mntp"] == trained


def test_mntp_refuses_causal_attention() -> None:
    with pytest.raises(ConfigError, match="bidirectional"):
        build_bundle(dataset_path="x.jsonl", objective="mntp", bidirectional=False)


def test_mntp_dry_run_counts_held_out_texts(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args, make_pairs
) -> None:
    rows = [*_texts(make_pairs)[:20], {"query": "q", "positive": "p"}]
    with pytest.raises(DatasetError, match=r"line 21: .*--objective contrastive"):
        build_bundle(
            **bundle_args(tiny_base, jsonl(tmp_path / "t.jsonl", rows), tmp_path),
            objective="mntp",
            dry_run=True,
        )
    result = build_bundle(
        **bundle_args(tiny_base, jsonl(tmp_path / "ok.jsonl", rows[:20]), tmp_path),
        objective="mntp",
        dry_run=True,
    )
    assert result.metrics == {"train_examples": 18, "eval_examples": 0, "eval_texts": 2}


def test_a_resumed_mntp_run_ends_where_a_straight_run_ends(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args, make_pairs
) -> None:
    data = jsonl(tmp_path / "texts.jsonl", _texts(make_pairs)[:40])
    knobs = {"objective": "mntp", "max_steps": 4, "batch_size": 4, "register_adapter": False}
    straight = build_bundle(**bundle_args(tiny_base, data, tmp_path), run_name="a", **knobs)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(
            2, lambda: build_bundle(**bundle_args(tiny_base, data, tmp_path), run_name="b", **knobs)
        )
    resumed = build_bundle(
        **bundle_args(tiny_base, data, tmp_path), run_name="b", resume=True, **knobs
    )
    assert resumed.metrics["steps"] == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.metrics["mntp"] == straight.metrics["mntp"]


def _interrupt_after(steps: int, build: Any) -> Any:
    """Run ``build`` and press Ctrl-C once ``steps`` optimisation steps are done."""
    from mongars_llm.training import _run

    original = _run.TrainingRun.run

    def run(self: Any, step_fn: Any, **kwargs: Any) -> None:
        def counted(step: int) -> Any:
            if step == steps:
                raise KeyboardInterrupt
            return step_fn(step)

        original(self, counted, **kwargs)

    _run.TrainingRun.run = run  # type: ignore[method-assign]
    try:
        return build()
    finally:
        _run.TrainingRun.run = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------ stacking
@pytest.fixture(scope="module")
def stacked(mntp: Any, tiny_base: Path, bundle_args, make_pairs) -> Any:
    root = mntp.run_dir.parent.parent
    train, evals = make_pairs(n_train=64, n_eval=16)
    data, eval_data = root / "pairs.jsonl", root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in evals))
    return build_bundle(
        **bundle_args(tiny_base, data, root),
        eval_dataset_path=eval_data,
        objective="contrastive",
        base_adapter="mntp",  # the registered name
        run_name="stacked",
        max_steps=10,
        learning_rate=3e-3,
    )


def test_contrastive_stacks_on_mntp_as_one_adapter(mntp: Any, stacked: Any) -> None:
    assert stacked.config.bidirectional is True  # inherited from the mntp adapter
    entry = stacked.registry_entry
    assert entry.compatibility.r == 32 and entry.compatibility.lora_alpha == 32
    config = json.loads((stacked.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 32
    assert entry.embedding["stacked_on"]["adapter"] == f"mntp {mntp.registry_entry.version}"
    assert entry.embedding["stacked_on"]["objective"] == "mntp"
    # the run's base is the mntp model: its metrics are where mntp's ended
    assert stacked.metrics["retrieval_base"] == pytest.approx(mntp.metrics["retrieval"], abs=1e-4)
    assert stacked.metrics["retrieval"]["mrr@10"] > stacked.metrics["retrieval_base"]["mrr@10"]


def test_the_stacked_adapter_embeds_as_it_was_trained(stacked: Any) -> None:
    """The runtime and the wrapper serve the one concatenated adapter on the plain base
    weights; their vectors are the trainer's (mntp merged into the base, contrastive LoRA
    on top)."""
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.training._records import load_tokenizer
    from mongars_llm.training._vectors import EmbeddingSpec, embedder

    texts = ["find dog fox", "the passage on fox dog is here.", "cat map"]
    model = stacked.model
    model.eval()
    spec = EmbeddingSpec.of(stacked.config, model)
    tokenizer = load_tokenizer(stacked.run_dir / "tokenizer")
    trained = embedder(model, tokenizer, spec, device="cpu", batch_size=8)(texts)
    registry = AdapterRegistry(stacked.config.registry_path)
    rt = UnifiedLLMRuntime.from_pretrained(
        stacked.config.base_model,
        device="cpu",
        dtype="float32",
        pooling=None,
        max_length=None,
        bidirectional=True,
        adapters=[("stacked", registry.adapter_path(stacked.registry_entry), "embed")],
    )
    try:
        served = rt.embed(texts)
    finally:
        rt.close()
    np.testing.assert_allclose(trained, served, rtol=1e-4, atol=1e-5)
    # and the exported wrapper, which knows nothing of stacking, embeds the same way
    spec_file = importlib.util.spec_from_file_location(
        "stacked_wrapper", stacked.wrapper_dir / "mongars_wrapper.py"
    )
    assert spec_file is not None and spec_file.loader is not None
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    wrapper = module.Wrapper.load(stacked.wrapper_dir, device="cpu")
    np.testing.assert_allclose(wrapper.embed(texts), served, rtol=1e-4, atol=1e-5)


def test_stacking_names_what_is_wrong(
    mntp: Any, tmp_path: Path, tiny_base: Path, jsonl, bundle_args, make_pairs
) -> None:
    train, _ = make_pairs(n_train=8, n_eval=0)
    data = jsonl(tmp_path / "pairs.jsonl", train)
    args = bundle_args(tiny_base, data, tmp_path)
    args["registry_path"] = mntp.config.registry_path
    with pytest.raises(ConfigError, match=r"'nope' is neither .*registered: mntp"):
        build_bundle(**args, objective="contrastive", base_adapter="nope", dry_run=True)
    with pytest.raises(ConfigError, match="adapts different layers"):  # before training
        build_bundle(
            **args,
            objective="contrastive",
            base_adapter=str(mntp.adapter_dir),
            target_modules=["q_proj", "v_proj"],
            max_steps=1,
            register_adapter=False,
        )
    with pytest.raises(ConfigError, match="stacks embedding adapters"):
        build_bundle(**args, base_adapter="mntp")
