"""The sentence-transformers export of an embedding adapter trained on the real model
(SmolLM2-135M, converted from its GGUF) embeds as the runtime does with that adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.train]

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")

INSTRUCTION = "Retrieve the passage about these animals"
TEXTS = ["find dog fox", "the passage on fox dog is here.", "What color is the sky?"]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_an_adapter_on_the_real_model_loads_in_sentence_transformers(
    bundle_args, smollm2_dir: Path, embed_rows: Path, tmp_path: Path
) -> None:
    from mongars_llm.export import export_wrapper
    from mongars_llm.runtime import UnifiedLLMRuntime
    from mongars_llm.training import build_bundle

    result = build_bundle(
        **bundle_args(smollm2_dir, embed_rows, tmp_path),
        objective="contrastive",
        run_name="smol-embed",
        max_steps=2,
        batch_size=4,
        learning_rate=1e-3,
        lora_r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        bidirectional=True,
        instruction=INSTRUCTION,
        seed=0,
    )
    folder = export_wrapper(result.run_dir, format="sentence-transformers")
    card = (folder / "README.md").read_text()
    assert f"`{smollm2_dir}`" in card and "| attention | bidirectional |" in card
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert settings["prompts"]["query"] == INSTRUCTION

    model = st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    documents = model.encode_document(TEXTS)
    queries = model.encode_query(TEXTS)
    prompted = model.encode(TEXTS, prompt="Find the answer")
    rt = UnifiedLLMRuntime.from_pretrained(smollm2_dir, device="cpu", dtype="float32")
    try:
        rt.load_adapter("smol-embed", result.adapter_dir, use="embed")
        assert model.max_seq_length == rt.max_length
        expected = rt.embed(TEXTS, bidirectional=True)
        assert _cosine(documents, expected).min() >= 0.9999
        expected_queries = rt.embed(TEXTS, bidirectional=True, instruction=INSTRUCTION)
        assert _cosine(queries, expected_queries).min() >= 0.9999
        pairs = rt.embed([["Find the answer", t] for t in TEXTS], bidirectional=True)
        assert _cosine(prompted, pairs).min() >= 0.9999
        assert _cosine(documents, rt.embed(TEXTS)).min() < 0.9999  # attention matters
    finally:
        rt.close()
