"""Embedding objectives (contrastive, simcse): data checks, a retrieval gain on held-out
pairs, the registered ``use="embed"`` adapter, and serving it beside a chat adapter."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import DatasetError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle
from mongars_llm.training._records import load_tokenizer

GOOD = {"query": "find dog fox", "positive": "the passage on fox dog is here."}
PAIR_LINES = [
    json.dumps(GOOD),  # 1 ok
    '{"query": "broken", ',  # 2 bad JSON
    "",  # 3 blank
    json.dumps({"query": "no positive"}),  # 4 missing field
    json.dumps({"query": 5, "positive": "x"}),  # 5 wrong type
    json.dumps({"query": "q", "positive": "  "}),  # 6 empty field
    json.dumps({"query": "same text", "positive": "same text"}),  # 7 query == positive
    json.dumps({"query": "q", "positive": "p", "extra": 1}),  # 8 unknown field
    json.dumps({"text": "simcse row"}),  # 9 another objective's row
    json.dumps({"query": "q2", "positive": "p2", "negative": "p2"}),  # 10 negative == positive
    json.dumps(GOOD),  # 11 duplicate of 1 (dropped)
    json.dumps({"query": "find cat map", "positive": "cat map", "instruction": "Find it"}),  # 12
]
BAD = [2, 4, 5, 6, 7, 8, 9, 10]


def test_every_bad_pair_line_is_reported_at_once(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args
) -> None:
    data = jsonl(tmp_path / "pairs.jsonl", PAIR_LINES)
    with pytest.raises(DatasetError) as info:
        build_bundle(**bundle_args(tiny_base, data, tmp_path), objective="contrastive")
    assert [p.line for p in info.value.problems] == BAD
    reasons = {p.line: p.reason for p in info.value.problems}
    assert "missing field(s) 'positive'" in reasons[4]
    assert "'query' must be a string" in reasons[5]
    assert "'positive' is empty" in reasons[6]
    assert "equals its positive" in reasons[7]
    assert "unknown field(s) 'extra'" in reasons[8]
    assert "--objective simcse" in reasons[9]
    assert "negative equals the positive" in reasons[10]
    for line in BAD:
        assert f"line {line}:" in str(info.value)


def test_dry_run_counts_add_up_and_duplicates_are_dropped(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args
) -> None:
    data = jsonl(tmp_path / "pairs.jsonl", PAIR_LINES)
    result = build_bundle(
        **bundle_args(tiny_base, data, tmp_path),
        objective="contrastive",
        skip_invalid=True,
        dry_run=True,
        eval_fraction=0.0,
    )
    summary = result.dataset_summary
    assert summary.format == "pairs"
    assert summary.lines_total == summary.rows_valid + summary.rows_invalid + summary.lines_blank
    assert (summary.rows_valid, summary.rows_invalid, summary.lines_blank) == (3, 8, 1)
    assert summary.duplicates == 1 and summary.rows_skipped == 8
    assert result.metrics["train_examples"] == summary.rows_valid - summary.duplicates == 2
    written = json.loads((result.run_dir / "dataset_summary.json").read_text())
    assert written["rows_valid"] == 3 and written["tokens"]["query"]["count"] == 2
    assert result.adapter_dir is None and not (result.run_dir / "adapter").exists()


# ----------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def contrastive(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, bundle_args, make_pairs
) -> Any:
    root = tmp_path_factory.mktemp("contrastive")
    train, evals = make_pairs()
    data, eval_data = root / "train.jsonl", root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in evals))
    return build_bundle(
        **bundle_args(tiny_base, data, root),
        eval_dataset_path=eval_data,
        objective="contrastive",
        run_name="pairs",
        max_steps=30,
        learning_rate=3e-3,  # a random hidden-64 model; 3e-4 is the default for real ones
    )


def test_contrastive_training_improves_held_out_retrieval(contrastive: Any) -> None:
    metrics = contrastive.metrics
    base, trained = metrics["retrieval_base"], metrics["retrieval"]
    assert set(base) >= {"mrr@10", "recall@1", "recall@10", "ndcg@10"}
    assert base["queries"] == trained["queries"] == 32
    assert trained["mrr@10"] >= base["mrr@10"] + 0.3, (base, trained)
    assert trained["recall@1"] > base["recall@1"]
    assert metrics["train_loss"] < contrastive.history[0]["loss"]
    assert metrics["steps"] == 30 and metrics["global_batch_size"] == 16


def test_the_registered_adapter_is_for_embeddings(contrastive: Any) -> None:
    registry = AdapterRegistry(contrastive.config.registry_path)
    entry = registry.get(contrastive.registry_entry.version)
    assert entry.use == "embed" and entry.objective == "contrastive"
    assert entry.embedding is not None
    assert entry.embedding["pooling"] == "mean" and entry.embedding["bidirectional"] is False
    assert entry.metrics["retrieval"] == contrastive.metrics["retrieval"]
    assert entry.metrics["retrieval_base"]["mrr@10"] < entry.metrics["retrieval"]["mrr@10"]
    assert entry.compatibility.r == 16 and entry.compatibility.target_modules  # all linear
    metadata = json.loads((contrastive.run_dir / "run_metadata.json").read_text())
    assert metadata["use"] == "embed" and metadata["objective"] == "contrastive"
    assert metadata["metrics"]["retrieval"] == contrastive.metrics["retrieval"]
    config = json.loads((contrastive.adapter_dir / "llm2vec_config.json").read_text())
    assert config["pooling_mode"] == "mean" and config["max_length"] == 64


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A chat LoRA with random (non-zero) weights: it changes generation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("chat") / "adapter"
    get_peft_model(model, lora).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def runtime(contrastive: Any, chat_adapter: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        contrastive.config.base_model,
        device="cpu",
        dtype="float32",
        max_length=64,
        adapters=[("chat", chat_adapter, "all")],
    )
    yield rt
    rt.close()


TEXTS = ["find dog fox", "the passage on fox dog is here.", ["Find it", "cat map"]]


def test_chat_is_unchanged_by_the_embed_adapter_while_embed_uses_it(
    contrastive: Any, runtime: Any
) -> None:
    prompts = ["Hello there", [{"role": "user", "content": "What is a fox?"}]]
    before = [runtime.generate(p, max_new_tokens=12, temperature=0.0).text for p in prompts]
    vectors_before = runtime.embed(TEXTS)
    registry = AdapterRegistry(contrastive.config.registry_path)
    entry = registry.get(contrastive.registry_entry.version)
    runtime.load_adapter("pairs", entry.resolve_path(registry.path), use=entry.use)
    try:
        after = [runtime.generate(p, max_new_tokens=12, temperature=0.0).text for p in prompts]
        vectors_after = runtime.embed(TEXTS)
    finally:
        runtime.unload_adapter("pairs")
    assert after == before
    assert any(text for text in before)
    assert not np.allclose(vectors_after, vectors_before, atol=1e-3)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_the_trainers_vectors_are_the_runtimes(contrastive: Any, bidirectional: bool) -> None:
    """Training and serving embed the same way: the trainer's encode path (eval mode)
    and the runtime's ``embed`` with the adapter give the same vectors."""
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.training._vectors import EmbeddingSpec, embedder

    model = contrastive.model
    model.eval()
    spec = EmbeddingSpec.of(contrastive.config, model)
    spec = dataclasses.replace(spec, bidirectional=bidirectional)
    tokenizer = load_tokenizer(contrastive.run_dir / "tokenizer")
    trained = embedder(model, tokenizer, spec, device="cpu", batch_size=8)(TEXTS)
    rt = UnifiedLLMRuntime.from_pretrained(
        contrastive.config.base_model,
        device="cpu",
        dtype="float32",
        pooling=None,  # from the adapter's llm2vec_config.json
        max_length=None,
        bidirectional=bidirectional,
        adapters=[("pairs", contrastive.adapter_dir, "embed")],
    )
    try:
        assert rt.max_length == 64
        served = rt.embed(TEXTS)
    finally:
        rt.close()
    np.testing.assert_allclose(trained, served, rtol=1e-4, atol=1e-5)


def test_simcse_trains_bidirectionally_and_registers(
    tmp_path: Path, tiny_base: Path, jsonl, bundle_args, make_pairs
) -> None:
    train, evals = make_pairs(n_train=40, n_eval=8)
    data = jsonl(tmp_path / "texts.jsonl", [{"text": r["positive"]} for r in train])
    result = build_bundle(
        **bundle_args(tiny_base, data, tmp_path),
        eval_dataset_path=jsonl(tmp_path / "eval.jsonl", evals),  # pairs: retrieval metrics
        objective="simcse",
        bidirectional=True,
        max_steps=4,
        learning_rate=1e-3,
    )
    assert result.dataset_summary.format == "texts"
    assert result.registry_entry is not None
    assert result.registry_entry.use == "embed" and result.registry_entry.objective == "simcse"
    assert result.registry_entry.embedding["bidirectional"] is True
    assert result.metrics["steps"] == 4 and result.metrics["retrieval"]["queries"] == 8
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[0] > 0  # two dropout views differ
    # the base model's attention dropout is back where it was
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in result.model.modules())
