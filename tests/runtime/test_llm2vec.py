"""The LLM2Vec core (runtime/_llm2vec.py) and the runtime's boundary around it: llm2vec's
strings and counting rule, word trimming, refused and explained pooling modes, typed errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mongars_llm.errors import InputTooLongError, InvalidInputError, UnsupportedError
from mongars_llm.runtime import EmbeddingWarning
from mongars_llm.runtime._llm2vec import (
    LLM2VEC_PROMPTS,
    EmbeddingInputError,
    compose,
    encode_inputs,
    eos_suffix,
    trim_words,
)

from .conftest import runtime_settings

SEP = "!@#$%^&*()"


def llm2vec_string(
    instruction: str, text: str, pooling: str, model_id: str, model_type: str
) -> tuple[str, str]:
    """llm2vec 0.2.3's ``_convert_to_str`` + ``prepare_for_tokenization`` + ``tokenize``
    split, as written there: the full string and the part whose tokens it counts."""
    s = f"{instruction.strip()} {SEP}{text}" if instruction else f"{SEP}{text}"
    if model_id == "meta-llama/Meta-Llama-3-8B-Instruct":
        s = "<|start_header_id|>user<|end_header_id|>\n\n" + s.strip() + "<|eot_id|>"
    else:
        if model_id in ("mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf"):
            s = "[INST] " + s.strip() + " [/INST]"
        if model_id == "google/gemma-2-9b-it":
            s = "<bos><start_of_turn>user\n" + s.strip() + "<end_of_turn>"
        if model_id in ("Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct"):
            s = "<|im_start|>user\n" + s.strip() + "<|im_end|>"
        if pooling == "eos_token":
            if model_id == "meta-llama/Meta-Llama-3-8B":
                s = s.strip() + "<|end_of_text|>"
            elif model_type in ("llama", "mistral"):
                s = s.strip() + " </s>"
            elif model_type == "gemma":
                s = s.strip() + "<eos>"
            elif model_type == "qwen2":
                s = s.strip() + "<|endoftext|>"
    parts = s.split(SEP)
    return "".join(parts), parts[1] if len(parts) > 1 else ""


class _Vocab:
    """Just what ``eos_suffix`` reads of a tokenizer."""

    def __init__(self, eos: str) -> None:
        self.eos_token = eos

    def get_vocab(self) -> dict[str, int]:
        return {"<|endoftext|>": 0, self.eos_token: 1}


EOS = {"llama": "</s>", "mistral": "</s>", "gemma": "<eos>", "qwen2": "<|im_end|>"}


@pytest.mark.parametrize(
    "model_id", ["local/model", "meta-llama/Meta-Llama-3-8B", *LLM2VEC_PROMPTS]
)
@pytest.mark.parametrize("model_type", list(EOS))
@pytest.mark.parametrize("pooling", ["mean", "eos_token"])
@pytest.mark.parametrize(
    ("instruction", "text"),
    [
        ("", "plain text"),
        ("Retrieve passages", "what is LoRA?"),
        ("  Retrieve passages  ", "  spaced text  "),
        ("   ", "a whitespace instruction"),
        ("Retrieve passages", ""),
        ("", "  "),
    ],
)
def test_compose_builds_llm2vecs_string_and_span(
    instruction: str, text: str, pooling: str, model_type: str, model_id: str
) -> None:
    eos = eos_suffix(_Vocab(EOS[model_type]), model_type, model_id)
    string, boundary = compose(
        instruction, text, pooling=pooling, prompt=LLM2VEC_PROMPTS.get(model_id), eos=eos
    )
    assert (string, string[boundary:]) == llm2vec_string(
        instruction, text, pooling, model_id, model_type
    )


def test_the_pooled_span_is_the_last_n_tokens_n_counted_on_the_text_alone(runtime: Any) -> None:
    tokenizer = runtime.tokenizer
    instruction = "Retrieve passages that answer the question"
    # " retrieve" is one token after the instruction; "retrieve" alone is two
    (item,) = encode_inputs(tokenizer, [(instruction, "retrieve")], pooling="mean", max_length=512)
    alone = tokenizer("retrieve", add_special_tokens=False)["input_ids"]
    in_context = tokenizer(f"{instruction} retrieve")["input_ids"]
    assert item.ids == in_context and len(alone) == 2
    assert item.pooled == [False] * (len(in_context) - 2) + [True] * 2
    (offsets,) = encode_inputs(
        tokenizer, [(instruction, "retrieve")], pooling="mean", max_length=512, span="offsets"
    )
    assert sum(offsets.pooled) == 1  # the old rule: only " retrieve"
    # the runtime pools llm2vec's span: the instruction's last token and " retrieve"
    with torch.inference_mode():
        hidden = runtime.decoder(input_ids=torch.tensor([in_context])).last_hidden_state
    expected = hidden[0, -2:].mean(0).numpy()
    got = runtime.embed([[instruction, "retrieve"]], normalize=False)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_overlong_inputs_are_cut_by_the_tokenizer_and_the_span_with_them(runtime: Any) -> None:
    tokenizer = runtime.tokenizer
    text = "word " * 100
    (item,) = encode_inputs(tokenizer, [("Retrieve", text)], pooling="mean", max_length=16)
    assert item.ids == tokenizer(f"Retrieve {text}", truncation=True, max_length=16)["input_ids"]
    assert all(item.pooled)  # the text alone has more than 16 tokens: all 16 are pooled
    with pytest.raises(EmbeddingInputError) as info:
        encode_inputs(tokenizer, [("", text)], pooling="mean", max_length=16, truncate=False)
    assert info.value.code == "input_too_long"
    with pytest.raises(InputTooLongError):
        runtime.embed([text * 10], truncate=False)


def test_doc_max_length_trims_words_as_llm2vec(runtime: Any) -> None:
    tokenizer = runtime.tokenizer
    text = " ".join(f"word{i}" for i in range(200))
    trimmed = trim_words(tokenizer, text, doc_max_length=40, max_length=512)
    assert text.startswith(trimmed) and len(tokenizer(trimmed)["input_ids"]) - 1 <= 40
    short = "a short text"
    assert trim_words(tokenizer, short, doc_max_length=40, max_length=512) == short
    (item,) = encode_inputs(
        tokenizer, [("", text)], pooling="mean", max_length=512, doc_max_length=40
    )
    assert item.ids == tokenizer(trimmed)["input_ids"]


def test_empty_and_malformed_inputs_are_invalid_input_errors(runtime: Any) -> None:
    for bad in ([], "", ["ok", " "], [["a", "b", "c"]], 3, [None]):
        with pytest.raises(InvalidInputError) as info:
            runtime.embed(bad)
        assert info.value.code == "invalid_input" and info.value.param == "texts"
        assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidInputError) as info:
        runtime.embed(["ok"], batch_size=0)
    assert info.value.param == "batch_size"
    with pytest.raises(InvalidInputError) as info:
        runtime.embed(["ok"], pooling="max")  # type: ignore[arg-type]
    assert info.value.param == "pooling"


async def test_aembed_takes_the_same_keywords(runtime: Any) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        await runtime.aembed(["ok"], pooling_mode="mean")
    with pytest.raises(InvalidInputError):
        await runtime.aembed([])
    got = await runtime.aembed(["ok"], pooling="last_token", normalize=False)
    np.testing.assert_allclose(
        got, runtime.embed(["ok"], pooling="last_token", normalize=False), rtol=1e-5, atol=1e-6
    )


@pytest.fixture
def private_runtime(tiny_model_dir: Path) -> Any:
    """A runtime whose tokenizer a test may change."""
    from mongars_llm.runtime import UnifiedLLMRuntime

    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=runtime_settings()) as rt:
        yield rt


def test_bos_pooling_needs_a_tokenizer_that_adds_a_bos(private_runtime: Any) -> None:
    from tokenizers import processors

    rt = private_runtime
    rt.tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert rt.tokenizer("Paris")["input_ids"][0] != rt.tokenizer.bos_token_id
    with pytest.raises(UnsupportedError, match="bos_token pooling needs a tokenizer") as info:
        rt.embed(["Paris"], pooling="bos_token")
    assert info.value.code == "unsupported"
    assert rt.embed(["Paris"], pooling="mean").shape == (1, rt.hidden_size)  # others still work


def test_eos_pooling_on_a_chat_eos_warns_once(private_runtime: Any) -> None:
    rt = private_runtime
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.embed(["Paris"], pooling="eos_token")  # "</s>" on a Llama: llm2vec's own suffix
    rt.tokenizer.eos_token = "<|im_end|>"  # a ChatML model (SmolLM2, Qwen2-Instruct style)
    fresh = type(rt)(
        model=rt.model,
        tokenizer=rt.tokenizer,
        model_id=rt.model_id,
        device=rt.device,
        dtype=rt.dtype,
        quantization=None,
        settings=rt.settings,
    )
    try:
        with pytest.warns(EmbeddingWarning, match=r"appends ' <\|im_end\|>'.*last_token"):
            got = fresh.embed(["Paris"], pooling="eos_token", normalize=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh.embed(["Paris"], pooling="eos_token")  # once per runtime
    finally:
        fresh.close()
    ids = rt.tokenizer("Paris <|im_end|>")["input_ids"]
    assert ids[-1] == rt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.inference_mode():
        hidden = rt.decoder(input_ids=torch.tensor([ids])).last_hidden_state
    np.testing.assert_allclose(got[0], hidden[0, -1].numpy(), rtol=1e-4, atol=1e-5)
