"""The wrapper embeds with the runtime's own LLM2Vec core (shipped next to it): the
runtime's vectors for every pooling mode, causal and bidirectional, with instructions,
long inputs and slow tokenizers, and the runtime's refusals and warnings."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import InvalidInputError, UnsupportedError
from mongars_llm.runtime import POOLING_MODES

INSTRUCTION = "Retrieve passages that answer the question"
# after the instruction, "retrieve" and "1000 numbers" have fewer tokens than alone with this
# byte-level BPE (no prefix space): llm2vec's counting rule and a character-offset rule disagree
PAIRS = [[INSTRUCTION, t] for t in ("retrieve", "1000 numbers", "What color is the sky?")]
TEXTS = ["The sky is blue.", "snow", "(grass) is green"]
LONG = "What color is the sky? The sky is blue. " * 90  # more tokens than max_length


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _wrapper_module(folder: Path) -> Any:
    """The exported loader, imported from its path (its folder is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("parity_wrapper", folder / "mongars_wrapper.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wrapper(bundle) -> Any:
    return _wrapper_module(bundle.wrapper_dir).Wrapper.load(bundle.wrapper_dir, device="cpu")


@pytest.fixture(scope="module")
def runtime(bundle) -> Iterator[Any]:
    from mongars_llm.runtime import UnifiedLLMRuntime

    rt = UnifiedLLMRuntime.from_pretrained(
        bundle.config.base_model,
        device="cpu",
        dtype="float32",
        adapters=[("bundle", bundle.adapter_dir)],
    )
    yield rt
    rt.close()


def test_both_cut_long_inputs_at_the_runtimes_max_length(wrapper: Any, runtime: Any) -> None:
    assert wrapper.max_length == runtime.max_length == 512
    assert len(runtime.tokenizer(LONG)["input_ids"]) > 600


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_wrapper_vectors_equal_the_runtimes(
    wrapper: Any, runtime: Any, pooling: str, bidirectional: bool
) -> None:
    inputs: list[Any] = [*PAIRS, *TEXTS, LONG]
    options = {"pooling": pooling, "bidirectional": bidirectional, "normalize": False}
    got = wrapper.embed(inputs, **options)
    expected = runtime.embed(inputs, **options)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert _cosine(got, expected).min() >= 0.99999
    normalised = wrapper.embed(inputs, pooling=pooling, bidirectional=bidirectional)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-5)


def test_bidirectional_comes_from_the_config(bundle, wrapper: Any) -> None:
    module = _wrapper_module(bundle.wrapper_dir)
    config = {**wrapper.config, "embedding": {**wrapper.config["embedding"], "bidirectional": True}}
    bidirectional = module.Wrapper(wrapper.model, wrapper.tokenizer, config, "cpu")
    np.testing.assert_array_equal(
        bidirectional.embed(TEXTS), wrapper.embed(TEXTS, bidirectional=True)
    )
    assert _cosine(bidirectional.embed(TEXTS), wrapper.embed(TEXTS)).min() < 0.9999


def test_a_slow_tokenizer_gives_the_same_vectors(bundle, wrapper: Any, slow_tokenizer) -> None:
    slow = slow_tokenizer(wrapper.tokenizer)
    assert not slow.is_fast
    module = _wrapper_module(bundle.wrapper_dir)
    with_slow = module.Wrapper(wrapper.model, slow, wrapper.config, "cpu")
    for pooling in ("mean", "weighted_mean", "eos_token"):
        np.testing.assert_allclose(
            with_slow.embed([*PAIRS, *TEXTS], pooling=pooling),
            wrapper.embed([*PAIRS, *TEXTS], pooling=pooling),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("bad", [[], [""], ["ok", "  "], [["only one"]], [3]])
def test_bad_input_is_refused_like_the_runtime(wrapper: Any, runtime: Any, bad: Any) -> None:
    with pytest.raises(InvalidInputError) as expected:
        runtime.embed(bad)
    with pytest.raises(ValueError) as got:
        wrapper.embed(bad)
    assert got.value.code == expected.value.code == "invalid_input"  # type: ignore[attr-defined]
    assert str(got.value) == str(expected.value)


def test_bos_pooling_without_a_bos_and_a_chat_eos_are_explained(bundle, wrapper: Any) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    module = _wrapper_module(bundle.wrapper_dir)
    tokenizer = AutoTokenizer.from_pretrained(bundle.wrapper_dir / "tokenizer")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    tokenizer.eos_token = "<|im_end|>"
    chat = module.Wrapper(wrapper.model, tokenizer, wrapper.config, "cpu")
    with pytest.raises(ValueError, match="bos_token pooling needs a tokenizer") as info:
        chat.embed(TEXTS, pooling="bos_token")
    assert info.value.code == UnsupportedError.default_code  # type: ignore[attr-defined]
    with pytest.warns(module._l2v.EmbeddingWarning, match="<\\|im_end\\|>"):
        chat.embed(TEXTS, pooling="eos_token")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat.embed(TEXTS, pooling="eos_token")  # once per wrapper
        wrapper.embed(TEXTS, pooling="eos_token")  # "</s>" is what llm2vec appends: silent
