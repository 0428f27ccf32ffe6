"""Shared fixtures: one tiny base model per session, small learnable datasets."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

COLOURS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "night": "black",
    "snow": "white",
    "cherry": "red",
    "ocean": "blue",
    "leaf": "green",
    "coal": "black",
    "cloud": "white",
}
TEMPLATES = ["What color is the {}?", "The {} has which color?", "Name the color of the {}."]


def write_jsonl(path: Path, rows: Iterable[object]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def colour_rows() -> list[dict[str, str]]:
    return [
        {"prompt": template.format(thing), "completion": f" The {thing} is {colour}."}
        for thing, colour in COLOURS.items()
        for template in TEMPLATES
    ]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test machine's cores are shared: one intra-op thread is many times faster
    for hidden-64 models than threads spinning against each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama (hidden 64, 2 layers) with a larger init so LoRA can learn fast."""
    from mongars_llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture
def jsonl():
    """``jsonl(path, rows)`` writes rows (objects or raw lines) and returns the path."""
    return write_jsonl


@pytest.fixture
def colours_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "colours.jsonl", colour_rows())


@pytest.fixture(scope="session")
def colours_file_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colours set once per session (for module-scoped fixtures; never write to it)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "colours.jsonl", colour_rows())


# keywords that are single tokens of the tiny tokenizer: an adapter can learn to pool them
KEYWORDS = [
    "dog",
    "fox",
    "cat",
    "map",
    "text",
    "model",
    "train",
    "server",
    "chat",
    "brown",
    "capital",
    "four",
    "two",
    "next",
    "over",
    "fine",
    "mean",
    "plus",
    "down",
    "low",
]


def pair_rows(n_train: int = 96, n_eval: int = 32, seed: int = 0) -> tuple[list, list]:
    """Synthetic retrieval pairs: ``find a b`` -> ``the passage on b a is here.`` with a
    hard negative sharing one keyword; the eval pairs use keyword pairs never trained on."""
    import random

    rng = random.Random(seed)
    combos = [(a, b) for a in KEYWORDS for b in KEYWORDS if a < b]
    rng.shuffle(combos)

    def row(a: str, b: str) -> dict[str, str]:
        c = rng.choice([k for k in KEYWORDS if k not in (a, b)])
        return {
            "query": f"find {a} {b}",
            "positive": f"the passage on {b} {a} is here.",
            "negative": f"the passage on {a} {c} is here.",
        }

    rows = [row(*c) for c in combos[: n_train + n_eval]]
    return rows[:n_train], rows[n_train:]


@pytest.fixture(scope="session")
def make_pairs():
    """``make_pairs(n_train, n_eval)``: see :func:`pair_rows`."""
    return pair_rows
