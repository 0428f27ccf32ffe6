"""``mongars-llm bundle eval``: retrieval metrics of a base model and an adapter, on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mongars_llm.cli import main

PAIRS = [
    {"query": "How long is the refund window?", "positive": "Refunds are accepted for 30 days."},
    {
        "query": "What does shipping abroad cost?",
        "positive": "International shipping costs 12 euros.",
        "negative": "Domestic shipping is free.",
    },
    {"query": "Is the laptop under warranty?", "positive": "Laptops carry a two year warranty."},
    {"query": "Can I pay by card?", "positive": "We accept Visa and Mastercard."},
]
KEYS = ["mrr@10", "recall@1", "recall@10", "ndcg@10"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", hidden_size=32)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA folder with non-zero weights (it changes the vectors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    return path


def test_json_has_base_adapter_and_delta(tiny_model, adapter_dir, pairs, capsys) -> None:
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--base-model", str(tiny_model)]
    assert main([*args, "--adapter", str(adapter_dir), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 4 and report["documents"] == 5
    for key in KEYS:
        assert 0.0 <= report["base"][key] <= 1.0
        assert report["delta"][key] == pytest.approx(report["adapter"][key] - report["base"][key])

    # the base figures are the library's, on the model without adapters
    from mongars_llm import UnifiedLLMRuntime
    from mongars_llm.training._retrieval import evaluate_pairs

    with UnifiedLLMRuntime.from_pretrained(tiny_model, device="cpu") as runtime:
        expected = evaluate_pairs(lambda texts: runtime.embed(texts, adapter=[]), PAIRS)
        runtime.load_adapter("tuned", adapter_dir, use="embed")
        tuned = runtime.embed([PAIRS[0]["positive"]])
        plain = runtime.embed([PAIRS[0]["positive"]], adapter=[])
    assert not np.allclose(tuned, plain)  # the adapter does change the vectors
    for key in KEYS:
        assert report["base"][key] == pytest.approx(expected[key])


def test_table_without_adapter(tiny_model, pairs, capsys) -> None:
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--base-model", str(tiny_model)]
    assert main([*args, "--pooling", "last_token", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 queries against 5 documents")
    assert "MRR@10" in out.upper() and "ndcg@10" in out
    assert "ADAPTER" not in out  # only the base column


def test_a_registry_name_gives_the_adapter_and_its_base_model(
    tiny_model, adapter_dir, pairs, tmp_path, capsys
) -> None:
    from mongars_llm.registry import AdapterRegistry

    registry = tmp_path / "registry"
    AdapterRegistry(registry).register(
        adapter_dir, name="shop-search", compatibility={"base_model": str(tiny_model)}
    )
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--registry-path", str(registry)]
    assert main([*args, "--adapter", "shop-search", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(tiny_model)
    assert report["adapter"]["name"] == "shop-search (version 1)"


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGARS_LLM_ADAPTER_REGISTRY_PATH": str(tmp_path / "empty-registry")}
    return subprocess.run(
        [sys.executable, "-m", "mongars_llm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--adapter", "no-such-adapter"], 2, ["'no-such-adapter'", "registry", "names there"]),
        (["--dataset-path", "missing.jsonl"], 1, ["missing.jsonl", "does not exist"]),
        (["--batch-size", "0"], 2, ["--batch-size 0"]),
    ],
)
def test_mistakes_are_one_line_and_the_documented_exit_code(
    tiny_model, pairs, tmp_path, extra, code, words
) -> None:
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--base-model", str(tiny_model)]
    result = _cli(*args, *extra, tmp_path=tmp_path)
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mongars-llm: error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert all(word in errors[0] for word in words), errors[0]


def test_bad_pairs_name_their_lines(tiny_model, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n{oops\n" + json.dumps({"query": "q"}) + "\n")
    args = ["bundle", "eval", "--dataset-path", str(bad), "--base-model", str(tiny_model)]
    result = _cli(*args, tmp_path=tmp_path)
    assert result.returncode == 1
    assert "line 2" in result.stderr and "line 3" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------- rerank columns
@pytest.fixture(scope="module")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer whose "yes" and " no" are single tokens (rerank)."""
    from mongars_llm.testing import TINY_CORPUS, build_tiny_model, build_tiny_tokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("rerank") / "tiny", hidden_size=32)
    tokenizer = build_tiny_tokenizer(512, [*TINY_CORPUS, "yes no yes no yes no. Answer: no."])
    tokenizer.save_pretrained(str(path))
    return path


def test_rerank_columns_sit_beside_the_embedding_ones(answering_model, pairs, capsys) -> None:
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--base-model", str(answering_model)]
    assert main([*args, "--rerank", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rerank = report["rerank"]
    assert rerank["top_k"] == 20 and rerank["rerank_adapter"] is None
    assert rerank["base"]["embed"] == pytest.approx(report["base"])
    assert set(rerank["base"]["rerank"]) == set(KEYS)
    assert all(0.0 <= v <= 1.0 for v in rerank["base"]["rerank"].values())

    # reranking one document per query changes no ranking
    assert main([*args, "--rerank", "--rerank-top-k", "1", "--device", "cpu", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)["rerank"]["base"]
    assert one["rerank"] == pytest.approx(one["embed"])

    assert main([*args, "--rerank", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "retrieve then rerank (each query's top 20 documents)" in out
    assert "base embedding + rerank (base weights)" in out


def test_a_rerank_adapter_reranks_beside_the_base_weights(
    answering_model, pairs, tmp_path, capsys
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mongars_llm.registry import AdapterRegistry

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(answering_model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path / "reranker"
    get_peft_model(model, lora).save_pretrained(folder)
    registry = tmp_path / "registry"
    compatibility = {"base_model": str(answering_model)}
    AdapterRegistry(registry).register(
        folder, name="shop-rerank", compatibility=compatibility, use="rerank", objective="rerank"
    )
    args = ["bundle", "eval", "--dataset-path", str(pairs), "--registry-path", str(registry)]
    # an --adapter registered with use=rerank reranks (and gives the base model)
    assert main([*args, "--adapter", "shop-rerank", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "adapter" not in report  # no embedding adapter
    rerank = report["rerank"]
    assert rerank["rerank_adapter"]["name"] == "shop-rerank (version 1)"
    assert set(rerank["base"]) == {"embed", "rerank", "rerank_adapter"}

    result = _cli(*args, "--rerank-adapter", str(pairs.parent), tmp_path=tmp_path)
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr
