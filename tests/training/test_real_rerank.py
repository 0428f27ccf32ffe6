"""A short ``rerank`` run on the real model (SmolLM2-135M) raises the positive's score that
``rt.rerank`` serves: the trainer's prompt, answer tokens and margin are the runtime's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.train]

ROWS = [
    {
        "query": "Which Voltrek kettle has a timer and a child lock?",
        "positive": "The black Voltrek electric kettle VO-118 offers a timer function and a "
        "child lock, for 45 euros.",
        "negative": "The black Voltrek electric kettle VO-502 offers a foldable design and "
        "energy class A, for 39 euros.",
    },
    {
        "query": "I need a quiet Nimbra blender that can go in the dishwasher.",
        "positive": "The white Nimbra blender NI-310 offers a quiet motor and dishwasher-safe "
        "parts, for 89 euros.",
        "negative": "The white Nimbra blender NI-977 offers Bluetooth connectivity and a "
        "carrying handle, for 95 euros.",
    },
]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_a_short_rerank_run_raises_the_positives_served_score(
    bundle_args, smollm2_dir: Path, tmp_path: Path, jsonl
) -> None:
    import torch

    from mongars_llm import UnifiedLLMRuntime
    from mongars_llm.training import build_bundle

    data = jsonl(tmp_path / "pairs.jsonl", ROWS)
    result = build_bundle(
        **bundle_args(smollm2_dir, data, tmp_path, max_seq_len=192),
        objective="rerank",
        rerank_negatives=1,
        batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        eval_fraction=0.0,
        seed=0,
    )
    assert result.registry_entry is not None and result.registry_entry.use == "rerank"

    def margins(rt: UnifiedLLMRuntime, adapter: list[str] | None) -> list[float]:
        out = []
        for row in ROWS:
            results = rt.rerank(row["query"], [row["positive"], row["negative"]], adapter=adapter)
            score = {r.index: r.score for r in results}
            out.append(_logit(score[0]) - _logit(score[1]))
        return out

    with UnifiedLLMRuntime.from_pretrained(smollm2_dir, device="cpu", dtype=torch.float32) as rt:
        before = margins(rt, [])
        rt.load_adapter("reranker", result.adapter_dir, use="rerank")
        after = margins(rt, None)  # a use="rerank" adapter is on for rerank calls
        chat = rt.generate("Say hi.", max_new_tokens=4, temperature=0).text
        plain = rt.generate("Say hi.", max_new_tokens=4, temperature=0, adapter=[]).text
    # the served yes-minus-no margin of the positive over its negative grows on every row
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    assert chat == plain  # chat never sees a rerank adapter
