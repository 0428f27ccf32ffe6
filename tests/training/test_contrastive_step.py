"""The cost of a contrastive step and of its retrieval evaluation: what the decoder is fed.

Short queries and long passages share a batch; padded together, most of the
step's compute goes to padding. These tests count the tokens the decoder really
runs (a hook on its embedding layer) and check that the vectors, the loss and the
gradient stay those of one padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from mongars_llm.training._config import load_bundle_config
from mongars_llm.training._contrastive import _contrastive_micro_batch, contrastive_batch
from mongars_llm.training._model import build_peft_model
from mongars_llm.training._pairs import PairExample
from mongars_llm.training._vectors import (
    EmbeddingSpec,
    embedder,
    encode_texts,
    evaluate_retrieval,
    forward_groups,
)

WORDS = ["the", "brown", "fox", "runs", "over", "two", "low", "dogs", "and", "cat", "maps", "text"]


def _model(tiny_base: Path, *, lora_dropout: float = 0.0) -> tuple[Any, Any, EmbeddingSpec]:
    from transformers import AutoModelForCausalLM

    config = load_bundle_config(
        base_model=str(tiny_base), objective="contrastive", lora_dropout=lora_dropout
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = build_peft_model(base, config)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a gradient path
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    return model, config, EmbeddingSpec.of(config, model)


def _pairs(n: int = 8) -> list[PairExample]:
    """Queries of 3 words, passages of about 40: the shapes of a knowledge-base set."""
    rows = []
    for i in range(n):
        passage = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(36 + i % 5))
        negative = " ".join(WORDS[(i + 2 * k) % len(WORDS)] for k in range(38 + i % 3))
        query = f"find {WORDS[i % len(WORDS)]} {WORDS[(i + 3) % len(WORDS)]}"
        rows.append(PairExample(line=i + 1, query=query, positive=passage, negative=negative))
    return rows


@contextmanager
def _fed_tokens(model: Any) -> Iterator[list[int]]:
    """Token positions (padding included) the decoder's embedding layer is called on."""
    from mongars_llm.runtime._llm2vec import decoder_of

    fed: list[int] = []
    layer = decoder_of(model).get_input_embeddings()
    handle = layer.register_forward_pre_hook(lambda _, args: fed.append(args[0].numel()))
    try:
        yield fed
    finally:
        handle.remove()


def _real_tokens(tokenizer: Any, items: list[tuple[str, str]], spec: EmbeddingSpec) -> int:
    from mongars_llm.training._vectors import _encode

    return sum(len(e) for e in _encode(tokenizer, items, spec))


def test_a_step_does_not_pad_queries_to_the_passages(tiny_base: Path, tiny_tokenizer: Any) -> None:
    model, config, spec = _model(tiny_base)
    pairs = _pairs()
    items = contrastive_batch(pairs, config, device="cpu").items
    real = _real_tokens(tiny_tokenizer, items, spec)
    with _fed_tokens(model) as fed:
        loss = _contrastive_micro_batch(
            model, tiny_tokenizer, spec, config, pairs, weight=1.0, device="cpu", dist=None
        )
    assert loss > 0
    # one batch padded to the longest passage runs 3 x 8 rows x ~45 positions (> 1.5x real)
    assert sum(fed) <= 1.15 * real + 64 * len(fed), (sum(fed), real, fed)


def test_the_grouped_step_has_the_loss_and_gradient_of_one_padded_batch(
    tiny_base: Path, tiny_tokenizer: Any
) -> None:
    from mongars_llm.training._vectors import _embed_encoded, _encode

    model, config, spec = _model(tiny_base)
    objective = contrastive_batch(_pairs(), config, device="cpu")
    assert len(forward_groups([len(e) for e in _encode(tiny_tokenizer, objective.items, spec)],
                              device="cpu")) > 1  # fmt: skip
    whole = objective.loss(
        _embed_encoded(model, tiny_tokenizer, _encode(tiny_tokenizer, objective.items, spec), spec,
                       device="cpu")
    )  # fmt: skip
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    grouped = objective.loss(
        encode_texts(model, tiny_tokenizer, objective.items, spec, device="cpu")
    )
    grouped.backward()
    assert float(grouped.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and len(got) > 10
    for name, grad in expected.items():  # float rounding: the groups pad to other widths
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_forward_groups_cut_where_padding_costs_more_than_a_forward() -> None:
    assert forward_groups([], device="cpu") == []
    assert forward_groups([5], device="cpu") == [[0]]
    # similar lengths: one forward; short queries beside long passages: two
    assert forward_groups([30, 31, 29, 30], device="cpu") == [[1, 0, 3, 2]]
    short_long = [4] * 16 + [40] * 32
    groups = forward_groups(short_long, device="cpu")
    assert sorted(map(sorted, groups)) == [list(range(16)), list(range(16, 48))]
    # on an accelerator a forward's fixed cost dominates: one forward, in order
    assert forward_groups(short_long, device="cuda:0") == [list(range(48))]


def test_the_retrieval_eval_runs_length_sorted_batches_with_the_same_metrics(
    tiny_base: Path, tiny_tokenizer: Any
) -> None:
    model, _, spec = _model(tiny_base)
    model.eval()
    pairs = _pairs(12)
    texts = (
        [e.query for e in pairs] + [e.positive for e in pairs] + [e.negative or "" for e in pairs]
    )
    real = _real_tokens(tiny_tokenizer, [("", t) for t in texts], spec)
    with _fed_tokens(model) as fed:
        found = evaluate_retrieval(
            model, tiny_tokenizer, pairs, spec, instruction=None, device="cpu", batch_size=8
        )
    assert found is not None and found["queries"] == 12 and found["documents"] == 24
    # corpus order would pad each batch of 8 to its longest passage (queries beside them)
    assert sum(fed) <= 1.1 * real, (sum(fed), real)
    # the vectors are each text's own: the same as embedding the texts one at a time
    alone = embedder(model, tiny_tokenizer, spec, device="cpu", batch_size=1)(texts)
    batched = embedder(model, tiny_tokenizer, spec, device="cpu", batch_size=8)(texts)
    assert batched.shape == alone.shape
    torch.testing.assert_close(
        torch.from_numpy(batched), torch.from_numpy(alone), atol=1e-5, rtol=0
    )
