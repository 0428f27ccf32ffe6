"""``rt.rerank`` on the real model, SmolLM2-135M-Instruct (marker ``real``).

What holds on the base weights: each score is the yes/no probability of a plain
forward pass over the whole prompt (the prompt's prefix and tail tokenised apart
give the ids of the whole prompt on this tokenizer), reranking keeps one copy of
the weights (resident memory), and batching changes no order. What does not hold:
the 135M base model's yes/no answer is close to chance on obvious cases (1-2 of 5
measured); that test is an expected failure until a rerank adapter
(``bundle build --objective rerank``) is loaded, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mongars_llm.settings import Settings

pytestmark = [pytest.mark.real, pytest.mark.slow]

CASES = [
    (
        "What is the capital of France?",
        [
            "Bananas are a good source of potassium.",
            "Paris is the capital and largest city of France.",
            "The Pacific Ocean is the largest ocean on Earth.",
        ],
        1,
    ),
    (
        "How do I reset my password?",
        [
            "Our office is closed on public holidays.",
            "Cats sleep for about 16 hours a day.",
            "To reset your password, click 'Forgot password' on the login page.",
        ],
        2,
    ),
    (
        "Who wrote Hamlet?",
        [
            "Hamlet is a tragedy written by William Shakespeare.",
            "Water boils at 100 degrees Celsius at sea level.",
            "Bananas are yellow.",
        ],
        0,
    ),
]


@pytest.fixture(scope="module")
def real_rt(smollm2_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    settings = Settings(
        model={"quantize_4bit": False, "max_new_tokens": 8, "batch_wait_ms": 5.0},
        _env_file=None,  # type: ignore[call-arg]
    )
    rt = UnifiedLLMRuntime.from_pretrained(
        smollm2_dir, device="cpu", dtype="float32", settings=settings
    )
    yield rt
    rt.close()


def _reference(rt: Any, query: str, document: str) -> float:
    import torch

    from mongars_llm.runtime import answer_token_ids, rerank_messages

    tok = rt.tokenizer
    text = tok.apply_chat_template(
        rerank_messages(query, document), add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    yes, no = answer_token_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = rt.model(input_ids=torch.tensor([ids])).logits[0, -1]
    return 1.0 / (1.0 + math.exp(-float(logits[yes] - logits[no])))


def test_scores_are_the_whole_prompts_yes_no_probability(real_rt: Any) -> None:
    query, documents, _ = CASES[0]
    results = real_rt.rerank(query, documents)
    for result in results:
        assert 0.0 < result.score < 1.0
        assert result.score == pytest.approx(_reference(real_rt, query, result.document), abs=1e-4)
    one_by_one = real_rt.rerank(query, documents, batch_size=1)
    assert [r.index for r in one_by_one] == [r.index for r in results]


def test_rerank_keeps_one_copy_of_the_weights(real_rt: Any) -> None:
    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        pytest.skip("no /proc/self/status on this system")
        return 0.0

    query, documents, _ = CASES[1]
    real_rt.generate([{"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=4)
    real_rt.embed(documents * 7)
    before = rss_mib()
    real_rt.rerank(query, documents * 7)
    after = rss_mib()
    # the model is ~540 MB in float32: a second copy would add that much
    assert after <= before * 1.05, (before, after)


@pytest.mark.xfail(
    reason="SmolLM2-135M base weights answer yes/no near chance; a rerank adapter fixes it",
    strict=False,
)
def test_the_relevant_passage_ranks_first_on_obvious_cases(real_rt: Any) -> None:
    hits = [real_rt.rerank(q, docs)[0].index == gold for q, docs, gold in CASES]
    assert all(hits), f"top-1 right for {sum(hits)} of {len(CASES)} queries"
