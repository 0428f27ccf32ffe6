"""The wrapper of an embedding bundle (``use="embed"``): its ``embed`` is the runtime's with
the adapter, its ``generate`` runs on the base weights, and it cannot be merged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mongars_llm.errors import BundleError

TEXTS = ["find dog fox", "the passage on fox dog is here.", ["Find it", "cat map"]]


def _wrapper(folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location("embed_wrapper", folder / "mongars_wrapper.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Wrapper.load(folder, device="cpu")


def test_the_wrapper_embeds_as_the_runtime_and_chats_on_the_base(embed_bundle: Any) -> None:
    from mongars_llm.runtime import UnifiedLLMRuntime

    config = json.loads((embed_bundle.wrapper_dir / "config.json").read_text())
    assert config["layout"]["adapter_use"] == "embed"
    assert config["embedding"]["pooling"] == "mean"
    wrapper = _wrapper(embed_bundle.wrapper_dir)
    base = UnifiedLLMRuntime.from_pretrained(
        embed_bundle.config.base_model, device="cpu", dtype="float32"
    )
    try:
        base.load_adapter("embed-me", embed_bundle.adapter_dir, use="embed")
        served = base.embed(TEXTS)
        np.testing.assert_allclose(wrapper.embed(TEXTS), served, rtol=1e-4, atol=1e-5)
        base.unload_adapter("embed-me")
        assert not np.allclose(base.embed(TEXTS), served, atol=1e-3)  # the adapter matters
        prompt = [{"role": "user", "content": "What color is the sky?"}]
        expected = base.generate(prompt, max_new_tokens=10, temperature=0.0).text
    finally:
        base.close()
    assert wrapper.generate(prompt, max_new_tokens=10) == expected


def test_an_embedding_bundle_is_not_merged(embed_bundle: Any, tmp_path: Path) -> None:
    from mongars_llm.export import export_wrapper

    with pytest.raises(BundleError, match="embedding adapter"):
        export_wrapper(embed_bundle.run_dir, output_dir=tmp_path / "w", merge=True)
