"""Inputs far over the token limit cost a prefix's tokenising, never the whole text."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import InputTooLongError
from mongars_llm.runtime._bounds import MARGIN, over_limit_prefix

LONG = "ab cd " * 33_333  # 199,998 characters


def test_a_prefix_over_the_limit_is_found_without_the_whole_text() -> None:
    counted: list[int] = []

    def count(text: str) -> int:  # one token per word
        counted.append(len(text))
        return len(text.split())

    cut, tokens = over_limit_prefix(count, "word " * 1_000_000, 100) or (0, 0)
    assert tokens > 100 + MARGIN and cut < 5_000_000
    assert sum(counted) < 20_000
    assert over_limit_prefix(count, "word " * 50, 100) is None  # short: never tokenised
    assert over_limit_prefix(count, "x" * 10_000, 100) is None  # one long token: whole text


def test_embedding_a_text_far_over_the_limit_is_refused_after_a_prefix(
    runtime: Any, tokenised_characters: Any
) -> None:
    with tokenised_characters(runtime.tokenizer) as seen, pytest.raises(InputTooLongError) as err:
        runtime.embed([LONG], truncate=False)
    assert f"more than max_length={runtime.max_length} tokens" in str(err.value)
    assert sum(seen) < 100_000  # of 199,998


def test_truncating_a_text_far_over_the_limit_gives_the_same_vector(
    runtime: Any, tokenised_characters: Any
) -> None:
    """The prefix keeps the text's first tokens: the vector is the one of the whole
    text cut by the tokenizer (computed on a prefix short enough to tokenise whole)."""
    short = LONG[: 4 * runtime.max_length]  # over the limit, under the first prefix tried
    assert runtime.count_tokens(short) > runtime.max_length
    with tokenised_characters(runtime.tokenizer) as seen:
        vector = runtime.embed([LONG])
    assert sum(seen) < 100_000
    np.testing.assert_allclose(vector, runtime.embed([short]), atol=1e-5)


def test_a_prompt_far_over_the_limit_is_refused_after_a_prefix(
    runtime: Any, tokenised_characters: Any
) -> None:
    match = "MONGARS_MODEL__MAX_INPUT_TOKENS"
    for prompt in (LONG, [{"role": "user", "content": LONG}]):
        with tokenised_characters(runtime.tokenizer) as seen:
            with_error = pytest.raises(InputTooLongError, match=match)
            with with_error:
                runtime.generate(prompt, max_new_tokens=1)
        assert sum(seen) < 100_000
