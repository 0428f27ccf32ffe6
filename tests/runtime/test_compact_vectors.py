"""Compact vectors from ``rt.embed``: ``precision`` (as sentence-transformers'
``quantize_embeddings``) and ``dimensions`` (refused unless the adapter was trained
for that truncation, or forced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import InvalidInputError
from mongars_llm.runtime import PRECISIONS, quantize_embeddings

TEXTS = [
    "LoRA adapters fine-tune a large model cheaply.",
    "Paris is the capital of France.",
    "Binary vectors use one bit per dimension.",
    "The cat sat on the mat.",
    "Retrieval ranks documents for a query.",
]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_embeddings_matches_sentence_transformers(precision: str) -> None:
    st_quantization = pytest.importorskip("sentence_transformers.quantization")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 37)).astype(np.float32)
    calibration = rng.standard_normal((120, 37)).astype(np.float32)
    ours = quantize_embeddings(vectors, precision, calibration=calibration)
    theirs = st_quantization.quantize_embeddings(
        vectors, precision, calibration_embeddings=calibration
    )
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    if precision.endswith("int8"):  # the batch's own min/max without calibration
        np.testing.assert_array_equal(
            quantize_embeddings(vectors, precision),
            st_quantization.quantize_embeddings(vectors, precision),
        )


def test_embed_precisions(runtime: Any) -> None:
    floats = runtime.embed(TEXTS)
    hidden = runtime.hidden_size
    int8 = runtime.embed(TEXTS, precision="int8")
    assert int8.dtype == np.int8 and int8.shape == (len(TEXTS), hidden)
    np.testing.assert_array_equal(int8, quantize_embeddings(floats, "int8"))
    uint8 = runtime.embed(TEXTS, precision="uint8", calibration=floats)
    assert uint8.dtype == np.uint8
    ubinary = runtime.embed(TEXTS, precision="ubinary")
    assert ubinary.dtype == np.uint8 and ubinary.shape == (len(TEXTS), (hidden + 7) // 8)
    np.testing.assert_array_equal(np.unpackbits(ubinary, axis=1)[:, :hidden], floats > 0)
    binary = runtime.embed(TEXTS, precision="binary")
    assert binary.dtype == np.int8
    np.testing.assert_array_equal(binary.astype(np.int16) + 128, ubinary)


def test_int8_of_one_text_needs_calibration(runtime: Any) -> None:
    with pytest.raises(InvalidInputError, match="calibration=") as caught:
        runtime.embed(TEXTS[0], precision="int8")
    assert caught.value.param == "calibration"
    calibration = runtime.embed(TEXTS)
    one = runtime.embed(TEXTS[0], precision="int8", calibration=calibration)
    np.testing.assert_array_equal(
        one, quantize_embeddings(runtime.embed(TEXTS[:1]), "int8", calibration=calibration)
    )


def test_unknown_precision_is_refused(runtime: Any) -> None:
    with pytest.raises(InvalidInputError, match="unknown precision 'int4'") as caught:
        runtime.embed(TEXTS, precision="int4")
    assert caught.value.param == "precision"


def test_dimensions_of_an_untrained_model_are_refused_unless_forced(runtime: Any) -> None:
    with pytest.raises(InvalidInputError, match="force_dimensions=True") as caught:
        runtime.embed(TEXTS, dimensions=8)
    assert caught.value.param == "dimensions"
    assert "not trained for truncation" in str(caught.value)
    full = runtime.embed(TEXTS)
    cut = runtime.embed(TEXTS, dimensions=8, force_dimensions=True)
    assert cut.shape == (len(TEXTS), 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=1e-5, atol=1e-6)
    raw = runtime.embed(TEXTS, dimensions=8, force_dimensions=True, normalize=False)
    np.testing.assert_allclose(raw, runtime.embed(TEXTS, normalize=False)[:, :8], rtol=1e-6)
    # the full size is always allowed
    assert runtime.embed(TEXTS, dimensions=runtime.hidden_size).shape == full.shape
    with pytest.raises(InvalidInputError, match="larger than the model"):
        runtime.embed(TEXTS, dimensions=runtime.hidden_size + 1, force_dimensions=True)


def test_binary_of_truncated_vectors(runtime: Any) -> None:
    bits = runtime.embed(TEXTS, dimensions=16, force_dimensions=True, precision="ubinary")
    assert bits.shape == (len(TEXTS), 2)


async def test_aembed_takes_the_compact_keywords(runtime: Any) -> None:
    vectors = await runtime.aembed(TEXTS, dimensions=8, force_dimensions=True, precision="binary")
    np.testing.assert_array_equal(
        vectors, runtime.embed(TEXTS, dimensions=8, force_dimensions=True, precision="binary")
    )
    with pytest.raises(InvalidInputError, match="dimensions=8 is refused"):
        await runtime.aembed(TEXTS, dimensions=8)


def test_an_adapter_trained_for_truncation_allows_its_dimensions(
    tiny_model_dir: Path, settings: Any, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    trained = tmp_path / "matryoshka"
    shutil.copytree(lora_dirs["retrieval"], trained)
    (trained / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "mean", "objective": "contrastive", "matryoshka_dims": [8, 16]})
    )
    with UnifiedLLMRuntime.from_pretrained(tiny_model_dir, settings=settings) as rt:
        rt.load_adapter("plain", lora_dirs["chat"], use="explicit")
        rt.load_adapter("mrl", trained, use="explicit")
        assert rt.trained_dimensions("mrl") == (8, 16)
        assert rt.trained_dimensions("plain") == ()
        assert rt.embed(TEXTS, adapter="mrl", dimensions=16).shape == (len(TEXTS), 16)
        with pytest.raises(InvalidInputError, match="trained for 8, 16 and") as caught:
            rt.embed(TEXTS, adapter="mrl", dimensions=12)
        assert caught.value.param == "dimensions"
        with pytest.raises(InvalidInputError, match="adapter"):
            rt.embed(TEXTS, adapter="plain", dimensions=16)
