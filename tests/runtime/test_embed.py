"""Embeddings: pooling vs hand computation, instruction spans, padding, bidirectional,
one copy of the weights, batching, batch invariance, errors."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from mongars_llm.errors import (
    AdapterNotFoundError,
    InputTooLongError,
    InvalidInputError,
    LLMRuntimeError,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris",
    "LoRA adapters fine-tune a large model by training small low-rank matrices.",
    "Question: what is two plus two? Answer: four.",
]
INSTRUCTION = "Retrieve passages that answer the question"


def hidden_states(rt: Any, text: str) -> tuple[list[int], torch.Tensor]:
    """The decoder's last hidden states for one unpadded text (plain transformers call)."""
    ids = rt.tokenizer(text)["input_ids"]
    with torch.inference_mode():
        out = rt.model.model(input_ids=torch.tensor([ids]))
    return ids, out.last_hidden_state[0].float()


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token", "bos_token"])
def test_pooling_matches_a_hand_computation(runtime: Any, pooling: str) -> None:
    text = TEXTS[0]
    ids, h = hidden_states(runtime, text)
    assert ids[0] == runtime.tokenizer.bos_token_id
    body = h[1:]  # the text's tokens (BOS is added by the tokenizer, not part of the text)
    expected = {
        "mean": body.mean(0),
        "weighted_mean": (body * torch.arange(1, len(body) + 1)[:, None]).sum(0)
        / (len(body) * (len(body) + 1) / 2),
        "last_token": h[-1],
        "bos_token": h[0],
    }[pooling]
    got = runtime.embed(text, pooling=pooling, normalize=False)
    assert got.shape == (1, runtime.hidden_size) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_eos_token_pooling_reads_an_appended_eos(runtime: Any) -> None:
    text = TEXTS[1]
    ids, h = hidden_states(runtime, text + " " + runtime.tokenizer.eos_token)
    assert ids[-1] == runtime.tokenizer.eos_token_id
    got = runtime.embed(text, pooling="eos_token", normalize=False)
    np.testing.assert_allclose(got[0], h[-1].numpy(), rtol=1e-4, atol=1e-5)


def test_instruction_is_read_but_not_pooled(runtime: Any) -> None:
    text = "what is two plus two?"
    _, h = hidden_states(runtime, f"{INSTRUCTION} {text}")
    n_instruction = len(runtime.tokenizer(INSTRUCTION)["input_ids"])  # BOS + instruction
    expected = h[n_instruction:].mean(0)
    got = runtime.embed([[INSTRUCTION, text]], normalize=False)
    np.testing.assert_allclose(got[0], expected.numpy(), rtol=1e-4, atol=1e-5)
    same = runtime.embed(text, instruction=INSTRUCTION, normalize=False)
    np.testing.assert_array_equal(same, got)
    # the instruction changes the text's states (causal context) but is not averaged in
    whole = h[1:].mean(0).numpy()
    assert not np.allclose(got[0], whole, atol=1e-4)


def test_padding_side_does_not_change_vectors(runtime: Any) -> None:
    inputs = [[INSTRUCTION, t] for t in TEXTS] + TEXTS
    tokenizer = runtime.tokenizer
    original = tokenizer.padding_side
    try:
        results = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            for pooling in ("mean", "weighted_mean", "last_token", "bos_token"):
                for bidirectional in (False, True):
                    results[side, pooling, bidirectional] = runtime.embed(
                        inputs, pooling=pooling, bidirectional=bidirectional, normalize=False
                    )
    finally:
        tokenizer.padding_side = original
    for (side, pooling, bidirectional), vectors in results.items():
        if side == "left":
            np.testing.assert_allclose(
                vectors, results["right", pooling, bidirectional], rtol=1e-4, atol=1e-5
            )


def test_empty_text_after_an_instruction_is_defined(runtime: Any) -> None:
    for pooling in ("mean", "weighted_mean", "eos_token", "last_token", "bos_token"):
        got = runtime.embed([[INSTRUCTION, ""], [INSTRUCTION, "Paris"]], pooling=pooling)
        assert np.isfinite(got).all(), pooling
    # the model reads "<instruction> " (LLM2Vec's separator space) and pools all of it
    _, h = hidden_states(runtime, INSTRUCTION + " ")
    got = runtime.embed([[INSTRUCTION, ""]], normalize=False)
    np.testing.assert_allclose(got[0], h.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_batched_results_are_in_input_order_and_equal_single_calls(runtime: Any) -> None:
    mixed = [*TEXTS, "a", TEXTS[2] * 3]
    batch = runtime.embed(mixed)
    singles = np.vstack([runtime.embed(t) for t in mixed])
    np.testing.assert_allclose(batch, singles, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)


def test_token_budget_splits_batches(tiny_model_dir: Any, events: Any) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    from .conftest import runtime_settings

    settings = runtime_settings(max_batch_tokens=64)
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings) as rt:
        texts = [TEXTS[2] * 2, *TEXTS, "x"]
        got = rt.embed(texts)
        (event,) = events.named("llm_embed")
        assert event["forward_batches"] > 1
        assert (
            event["padded_tokens"] <= 64 * event["forward_batches"] or event["forward_batches"] >= 3
        )
        lengths = sorted((len(rt.tokenizer(t)["input_ids"]) for t in texts), reverse=True)
        assert event["tokens"] == sum(lengths)
        singles = np.vstack([rt.embed(t) for t in texts])
        np.testing.assert_allclose(got, singles, rtol=1e-4, atol=1e-5)


def test_batch_invariant_mode_is_exact(runtime: Any) -> None:
    a = "Paris is the capital of France."
    long_mates = [TEXTS[2] * 4, TEXTS[0] * 3]
    alone = runtime.embed([a], batch_invariant=True)
    for bidirectional in (False, True):
        alone = runtime.embed([a], batch_invariant=True, bidirectional=bidirectional)
        mixed = runtime.embed(
            [long_mates[0], a, long_mates[1]], batch_invariant=True, bidirectional=bidirectional
        )
        np.testing.assert_allclose(mixed[1], alone[0], rtol=0, atol=1e-6)


def test_bidirectional_differs_from_causal(runtime: Any) -> None:
    causal = runtime.embed(TEXTS, bidirectional=False)
    bidirectional = runtime.embed(TEXTS, bidirectional=True)
    assert not np.allclose(causal, bidirectional, atol=1e-4)
    # causal: the first token's state cannot see the rest; bidirectional: it can
    a = runtime.embed(["Paris is nice", "Paris is big"], pooling="bos_token", bidirectional=False)
    np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-6)
    b = runtime.embed(["Paris is nice", "Paris is big"], pooling="bos_token", bidirectional=True)
    assert not np.allclose(b[0], b[1], atol=1e-4)


def test_chat_stays_causal_while_bidirectional_embeddings_run(runtime: Any) -> None:
    prompt = [{"role": "user", "content": "The quick brown fox"}]
    expected = runtime.generate(prompt, temperature=0, max_new_tokens=24)
    reference = runtime.embed(TEXTS, bidirectional=True)
    stop = threading.Event()
    mismatches: list[Any] = []

    def embed_loop() -> None:
        while not stop.is_set():
            got = runtime.embed(TEXTS, bidirectional=True)
            if not np.allclose(got, reference, atol=1e-5):
                mismatches.append(got)

    workers = [threading.Thread(target=embed_loop) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        replies = [runtime.generate(prompt, temperature=0, max_new_tokens=24) for _ in range(4)]
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert all(r == expected for r in replies)
    assert not mismatches
    assert getattr(runtime.model.config, "is_causal", True) is not False


def test_embeddings_and_generation_share_one_copy_of_the_weights(runtime: Any) -> None:
    decoder = runtime.decoder
    assert decoder is runtime.model.model
    gen_ptrs = {p.data_ptr() for p in runtime.model.parameters()}
    assert {p.data_ptr() for p in decoder.parameters()} <= gen_ptrs
    q_proj = decoder.layers[0].self_attn.q_proj
    assert (
        q_proj.weight.data_ptr() == runtime.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    )
    calls: list[str] = []
    handle = q_proj.register_forward_hook(lambda *a: calls.append("call"))
    try:
        runtime.embed("Paris")
        after_embed = len(calls)
        runtime.generate("Paris", temperature=0, max_new_tokens=2)
    finally:
        handle.remove()
    assert after_embed >= 1 and len(calls) > after_embed  # the same module served both


@pytest.mark.parametrize(
    ("texts", "kwargs", "error"),
    [
        ([], {}, InvalidInputError),
        ([""], {}, InvalidInputError),
        (["ok", "  "], {}, InvalidInputError),
        ([["only one"]], {}, InvalidInputError),
        ([3], {}, InvalidInputError),
        (["ok"], {"pooling": "max"}, InvalidInputError),
        (["ok"], {"adapter": "missing"}, AdapterNotFoundError),
        (["word " * 600], {"truncate": False}, InputTooLongError),
    ],
)
def test_bad_embedding_input_has_a_stable_code(
    runtime: Any, texts: Any, kwargs: dict[str, Any], error: type[LLMRuntimeError]
) -> None:
    with pytest.raises(error) as info:
        runtime.embed(texts, **kwargs)
    assert type(info.value) is error and info.value.code == error.default_code


def test_overlong_input_is_truncated_by_default(runtime: Any) -> None:
    got = runtime.embed(["word " * 600])
    assert got.shape == (1, runtime.hidden_size) and np.isfinite(got).all()


def test_embedding_logs_an_event(runtime: Any, events: Any) -> None:
    runtime.embed(TEXTS, pooling="mean")
    (event,) = events.named("llm_embed")
    assert event["batch_size"] == len(TEXTS) and event["requests"] == 1
    assert event["pooling"] == "mean" and event["bidirectional"] is False
    assert event["device"] == "cpu" and event["dtype"] == "float32"
    assert event["tokens"] == sum(len(runtime.tokenizer(t)["input_ids"]) for t in TEXTS)
