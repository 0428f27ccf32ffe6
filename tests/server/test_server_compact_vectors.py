"""Compact vectors on ``/v1/embeddings``: ``dimensions`` (refused unless trained or
forced) and the ``int8``/``binary``/``ubinary`` encodings, with the official client."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from serving_support import make_lora_adapter

from mongars_llm.runtime import quantize_embeddings
from mongars_llm.server import create_app

pytestmark = pytest.mark.serve

TEXTS = ["LoRA adapters fine-tune a large model.", "Paris is the capital of France."]


def test_dimensions_are_refused_for_an_untrained_model(client: Any) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(model="embedding", input=TEXTS, dimensions=8)
    error = caught.value.body
    assert error["param"] == "dimensions"
    assert "not trained for truncation" in error["message"]
    assert '"force_dimensions": true' in error["message"]


def test_int8_and_binary_encodings(client: Any, runtime: Any) -> None:
    floats = runtime.embed(TEXTS)
    int8 = client.embeddings.create(model="embedding", input=TEXTS, encoding_format="int8")  # type: ignore[arg-type]
    vectors = np.array([d.embedding for d in int8.data])
    assert vectors.shape == floats.shape and np.abs(vectors).max() == 127
    assert all(float(v).is_integer() for v in vectors.ravel())
    scale = np.abs(floats).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(vectors, np.rint(floats / scale * 127))
    cosine = (vectors[0] @ vectors[1]) / np.linalg.norm(vectors, axis=1).prod()
    assert cosine == pytest.approx(float(floats[0] @ floats[1]), abs=0.01)
    for encoding in ("binary", "ubinary"):
        answer = client.embeddings.create(
            model="embedding",
            input=TEXTS,
            encoding_format=encoding,  # type: ignore[arg-type]
            dimensions=16,
            extra_body={"force_dimensions": True},
        )
        packed = np.array([d.embedding for d in answer.data])
        expected = quantize_embeddings(floats[:, :16], encoding)
        np.testing.assert_array_equal(packed, expected)
        assert packed.shape == (2, 2)


def test_an_unknown_encoding_is_a_422(live_server: Any) -> None:
    response = httpx.post(
        f"{live_server.url}/v1/embeddings",
        json={"model": "embedding", "input": "x", "encoding_format": "int4"},
    )
    assert response.status_code == 422
    assert "encoding_format" in response.text


def test_a_matryoshka_adapter_serves_its_dimensions(
    serve: Callable[..., AbstractContextManager[Any]],
    server_settings: Any,
    private_runtime: Any,
    manager: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    folder = make_lora_adapter(tiny_model_dir, tmp_path / "mrl", seed=3)
    (folder / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "mean", "objective": "contrastive", "matryoshka_dims": [8]})
    )
    private_runtime.load_adapter("mrl", folder, use="explicit")
    app = create_app(server_settings, private_runtime, manager)
    with serve(app) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        short = client.embeddings.create(model="embedding:mrl", input=TEXTS, dimensions=8)
        vectors = np.array([d.embedding for d in short.data])
        full = private_runtime.embed(TEXTS, adapter="mrl")
        expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(openai.UnprocessableEntityError, match="trained for 8 and"):
            client.embeddings.create(model="embedding:mrl", input=TEXTS, dimensions=16)
