"""Tiny trained bundles shared by the export tests: a chat one and an embedding one."""

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
def bundle(bundle_args, tmp_path_factory: pytest.TempPathFactory):
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
    return build_bundle(
        **bundle_args(base, data, root),
        run_name="export-me",
        max_steps=30,
        batch_size=3,
        learning_rate=5e-3,
        target_modules=["all-linear"],
        eval_fraction=0.0,
    )


KEYWORDS = ["dog", "fox", "cat", "map", "text", "model", "train", "server", "chat", "brown"]


@pytest.fixture(scope="session")
def embed_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Query/passage pairs for a contrastive run."""
    rows = [
        {"query": f"find {a} {b}", "positive": f"the passage on {b} {a} is here."}
        for a in KEYWORDS
        for b in KEYWORDS
        if a < b
    ]
    data = tmp_path_factory.mktemp("embed-rows") / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture(scope="session")
def embed_bundle(bundle, bundle_args, embed_rows: Path, tmp_path_factory: pytest.TempPathFactory):
    """A contrastive bundle (``embed-me``, registered) on the export tests' base model."""
    from mongars_llm.training import build_bundle

    root = tmp_path_factory.mktemp("embed-bundle")
    return build_bundle(
        **bundle_args(Path(bundle.config.base_model), embed_rows, root),
        objective="contrastive",
        run_name="embed-me",
        max_steps=8,
        learning_rate=3e-3,
    )


@pytest.fixture
def base_dir(bundle) -> Path:
    return Path(bundle.config.base_model)


@pytest.fixture(scope="session")
def slow_tokenizer():
    """``slow_tokenizer(fast)``: a Python ("slow") tokenizer with ``fast``'s vocabulary and
    splits, which has no character offsets (``is_fast`` is False)."""
    from transformers import PreTrainedTokenizer

    class SlowTokenizer(PreTrainedTokenizer):
        def __init__(self, fast, **kwargs):
            self._fast = fast
            self._vocab = fast.get_vocab()
            self._inverse = {index: token for token, index in self._vocab.items()}
            super().__init__(
                bos_token=fast.bos_token,
                eos_token=fast.eos_token,
                unk_token=fast.unk_token,
                pad_token=fast.pad_token,
                padding_side=fast.padding_side,
                **kwargs,
            )

        @property
        def vocab_size(self) -> int:
            return len(self._vocab)

        def get_vocab(self):
            return dict(self._vocab)

        def _tokenize(self, text, **kwargs):
            ids = self._fast(text, add_special_tokens=False)["input_ids"]
            return self._fast.convert_ids_to_tokens(ids)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, self._vocab[self.unk_token])

        def _convert_id_to_token(self, index):
            return self._inverse[index]

        def convert_tokens_to_string(self, tokens):
            return self._fast.convert_tokens_to_string(tokens)

        def build_inputs_with_special_tokens(self, ids0, ids1=None):
            return [self.bos_token_id, *ids0, *([self.bos_token_id, *ids1] if ids1 else [])]

        def num_special_tokens_to_add(self, pair=False):
            return 2 if pair else 1

    return SlowTokenizer
