"""A tiny trained bundle shared by the export tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Shared cores: one intra-op thread is much faster for hidden-64 models."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    """A registered bundle trained for a few steps on a random tiny llama."""
    from mongars_llm.testing import build_tiny_model
    from mongars_llm.training import build_bundle

    root = tmp_path_factory.mktemp("bundle")
    base = build_tiny_model(root / "base", initializer_range=0.2)
    data = root / "data.jsonl"
    rows = [
        {"prompt": f"What color is the {thing}?", "completion": f" The {thing} is {colour}."}
        for thing, colour in [
            ("sky", "blue"),
            ("grass", "green"),
            ("snow", "white"),
            ("coal", "black"),
            ("apple", "red"),
            ("ocean", "blue"),
        ]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = build_bundle(
        dataset_path=data,
        base_model=str(base),
        output_dir=root / "runs",
        registry_path=root / "registry",
        run_name="export-me",
        max_steps=30,
        batch_size=3,
        learning_rate=5e-3,
        target_modules=["all-linear"],
        max_seq_len=64,
        eval_fraction=0.0,
        progress=False,
    )
    return result


@pytest.fixture
def base_dir(bundle) -> Path:
    return Path(bundle.config.base_model)
