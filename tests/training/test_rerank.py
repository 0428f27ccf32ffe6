"""The ``rerank`` objective: the contrastive rows' checks, a loss that falls on a separable
set, the registered ``use="rerank"`` adapter, ``--resume``, and the loss functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_embedding import BAD, PAIR_LINES  # tests/training is on sys.path (rootdir mode)

from mongars_llm.errors import BundleError, ConfigError, DatasetError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import adapter_use, build_bundle, describe_use, is_chat_adapter

#: "yes" and " no" are single tokens of a tiny tokenizer trained with this line
ANSWERS = "yes no yes no yes no yes no. Answer: yes. Answer: no."


@pytest.fixture(scope="module")
def rerank_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama with a tokenizer that can answer yes or no in one token."""
    from mongars_llm.testing import TINY_CORPUS, build_tiny_model, build_tiny_tokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("rerank") / "tiny", initializer_range=0.2)
    tokenizer = build_tiny_tokenizer(512, [*TINY_CORPUS, ANSWERS])
    assert len(tokenizer) == 512  # the model's vocabulary
    tokenizer.save_pretrained(str(path))
    return path


def separable_rows(n: int) -> list[dict[str, str]]:
    """Each positive says "fox", its negative never does: one token tells them apart."""
    words = ["dog", "cat", "map", "text", "model", "train", "server", "chat", "capital"]
    rows = []
    for i in range(n):
        a, b = words[i % len(words)], words[(i * 4 + 3) % len(words)]
        rows.append(
            {
                "query": f"find {a} {b} number {i}",
                "positive": f"the fox passage on {a} {b} is here {i}.",
                "negative": f"the passage on {b} {a} is here {i}.",
            }
        )
    return rows


def test_every_bad_pair_line_is_reported_as_for_contrastive(
    tmp_path: Path, rerank_base: Path, jsonl, bundle_args
) -> None:
    data = jsonl(tmp_path / "pairs.jsonl", PAIR_LINES)
    with pytest.raises(DatasetError) as info:
        build_bundle(**bundle_args(rerank_base, data, tmp_path), objective="rerank")
    assert [p.line for p in info.value.problems] == BAD
    assert "--objective simcse" in {p.line: p.reason for p in info.value.problems}[9]


def test_dry_run_counts_the_rows_and_holds_out_pairs(
    tmp_path: Path, rerank_base: Path, jsonl, bundle_args
) -> None:
    data = jsonl(tmp_path / "pairs.jsonl", separable_rows(20))
    result = build_bundle(
        **bundle_args(rerank_base, data, tmp_path), objective="rerank", dry_run=True
    )
    assert result.metrics == {"train_examples": 18, "eval_examples": 2}
    assert result.dataset_summary.format == "pairs"
    assert result.adapter_dir is None and not (result.run_dir / "adapter").exists()
    assert result.config.batch_size == 8 and result.config.lora_r == 16  # rerank defaults


@pytest.fixture(scope="module")
def reranker(
    tmp_path_factory: pytest.TempPathFactory, rerank_base: Path, bundle_args
) -> tuple[Any, dict[str, Any]]:
    root = tmp_path_factory.mktemp("rerank-run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(32)))
    knobs = bundle_args(
        rerank_base,
        data,
        root,
        max_seq_len=512,  # the whole prompt (the tiny tokenizer spends many tokens on it)
        objective="rerank",
        rerank_negatives=1,  # the own negative only: separable by one token
        batch_size=4,
        max_steps=24,
        save_steps=12,
        learning_rate=3e-3,  # a random hidden-64 model
        eval_fraction=0.25,
    )
    return build_bundle(**knobs, run_name="rerank"), knobs


def test_rerank_training_lowers_the_loss_on_a_separable_set(reranker) -> None:
    result, _ = reranker
    losses = [h["loss"] for h in result.history]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # listwise over (positive, negative): log 2 = 0.69 at chance
    assert last < 0.5 * first, losses
    metrics = result.metrics
    assert metrics["steps"] == 24 and metrics["rows_seen"] == 24 * 4
    assert metrics["rerank"]["queries"] == metrics["rerank_base"]["queries"] == 8
    assert metrics["rerank"]["top_k"] == 16  # every held-out document
    assert "retrieval" not in metrics  # embeddings are not what it trains


def test_the_registered_adapter_is_for_rerank_calls_only(reranker) -> None:
    result, _ = reranker
    entry = AdapterRegistry(result.config.registry_path).get(result.registry_entry.version)
    assert entry.use == "rerank" and entry.objective == "rerank"
    assert entry.embedding is None
    assert entry.metrics["rerank"] == result.metrics["rerank"]
    assert not (result.adapter_dir / "llm2vec_config.json").exists()
    metadata = json.loads((result.run_dir / "run_metadata.json").read_text())
    assert metadata["use"] == "rerank" and metadata["objective"] == "rerank"
    assert adapter_use(result.adapter_dir) == ("rerank", "rerank")
    assert not is_chat_adapter("rerank", "rerank")
    assert describe_use("rerank", "rerank") == "rerank adapter (use=rerank, objective rerank)"
    wrapper = json.loads((result.run_dir / "wrapper_config.json").read_text())
    assert wrapper["layout"] == {"adapter_use": "rerank"}  # the wrapper's chat runs without it


def test_a_rerank_adapter_is_not_a_base_adapter(reranker, tmp_path: Path, bundle_args) -> None:
    result, knobs = reranker
    with pytest.raises(ConfigError, match=r"rerank adapter .* not an embedding adapter"):
        build_bundle(
            **{**knobs, "objective": "contrastive", "rerank_negatives": None},
            base_adapter=str(result.adapter_dir),
            run_name="stacked",
            dry_run=True,
        )
    with pytest.raises(ConfigError, match="objective 'rerank' trains on the base weights"):
        build_bundle(**knobs, base_adapter=str(result.adapter_dir), run_name="x", dry_run=True)


def test_resume_continues_to_the_same_adapter(reranker) -> None:
    import torch
    from safetensors.torch import load_file

    result, knobs = reranker
    checkpoint = result.run_dir / "checkpoints" / "step-00000012"
    resumed = build_bundle(**knobs, run_name="resumed", resume=checkpoint, register_adapter=False)
    assert resumed.metrics["steps"] == 24
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in result.history], rel=1e-4
    )
    a = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(BundleError, match="rerank_loss"):
        build_bundle(**{**knobs, "rerank_loss": "bce"}, run_name="changed", resume=checkpoint)


def test_a_query_without_any_negative_is_refused(
    tmp_path: Path, rerank_base: Path, jsonl, bundle_args
) -> None:
    rows = [{k: v for k, v in r.items() if k != "negative"} for r in separable_rows(6)]
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(BundleError, match="needs a negative document for every query"):
        build_bundle(
            **bundle_args(rerank_base, data, tmp_path),
            objective="rerank",
            batch_size=1,
            max_steps=1,
            eval_fraction=0.0,
        )


def test_candidates_never_count_a_positive_of_the_same_query_as_negative() -> None:
    from mongars_llm.training._pairs import PairExample
    from mongars_llm.training._rerank import rerank_candidates

    batch = [
        PairExample(1, "q1", "p1", "n1"),
        PairExample(2, "q1", "p1b"),  # a second positive of q1
        PairExample(3, "q3", "p3", "p1"),  # its negative is q1's positive
    ]
    groups = [docs for _, docs in rerank_candidates(batch, 3)]
    # the positive first, then its own negative, then the next rows' documents in turn;
    # p1 and p1b are both q1's positives: never a negative of q1
    assert groups == [["p1", "n1", "p3"], ["p1b", "p3", "n1"], ["p3", "p1", "n1", "p1b"]]
    assert [docs for _, docs in rerank_candidates(batch, 1)] == [
        ["p1", "n1"],
        ["p1b", "p3"],
        ["p3", "p1"],
    ]


def test_listwise_and_bce_losses() -> None:
    import math

    import torch

    from mongars_llm.training._rerank import rerank_loss

    margins = torch.tensor([2.0, 0.0, 0.0, 1.0, 1.0])
    listwise = rerank_loss(margins, [3, 2], "listwise")
    expected = (math.log(math.exp(2) + 2) - 2) + math.log(2)
    assert float(listwise) == pytest.approx(expected, rel=1e-6)
    bce = rerank_loss(torch.tensor([0.0, 0.0]), [2], "bce")
    assert float(bce) == pytest.approx(math.log(2), rel=1e-6)


def test_batched_margins_are_each_prompts_own_in_input_order(rerank_base: Path) -> None:
    """Prompts of different lengths are run in length-sorted groups; each margin comes
    back at its own prompt's place, equal to the prompt scored alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mongars_llm.training._rerank import RerankScorer

    tokenizer = AutoTokenizer.from_pretrained(str(rerank_base))
    model = AutoModelForCausalLM.from_pretrained(str(rerank_base), dtype=torch.float32).eval()
    scorer = RerankScorer.of(tokenizer, 512)
    documents = ["a", "the fox passage on dog cat is here", "map", "the model and the chat"]
    prompts = scorer.prompts([("find dog cat", d, None) for d in documents])
    assert len({len(p) for p in prompts}) > 1 and prompts[0] != sorted(prompts, key=len)[-1]
    with torch.inference_mode():
        batched = scorer.margins(model, prompts, device="cpu")
        alone = [float(scorer.margins(model, [p], device="cpu")[0]) for p in prompts]
    assert batched.tolist() == pytest.approx(alone, abs=1e-4)
    assert len(set(alone)) == len(alone)  # different prompts, different margins


def test_the_cli_builds_a_rerank_dry_run_with_its_flags(
    tmp_path: Path, rerank_base: Path, jsonl, capsys
) -> None:
    from mongars_llm.cli import main

    data = jsonl(tmp_path / "pairs.jsonl", separable_rows(10))
    argv = ["bundle", "build", "--objective", "rerank", "--dataset-path", str(data)]
    argv += ["--base-model", str(rerank_base), "--output-dir", str(tmp_path / "runs")]
    argv += ["--rerank-negatives", "2", "--rerank-loss", "bce", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dataset: 10 valid record(s)" in out and "9 training row(s), 1 eval row(s)" in out
    metadata = json.loads(
        next((tmp_path / "runs").iterdir()).joinpath("dataset_summary.json").read_text()
    )
    assert metadata["format"] == "pairs"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-5], "--rerank-loss", "softmax", "--dry-run"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'softmax'" in capsys.readouterr().err


def test_a_rerank_bundle_is_not_merged_into_the_weights(reranker, tmp_path: Path) -> None:
    from mongars_llm.export import export_wrapper

    result, _ = reranker
    with pytest.raises(BundleError, match=r"rerank adapter .*would change chat too"):
        export_wrapper(result.run_dir, output_dir=tmp_path / "w", merge=True)
