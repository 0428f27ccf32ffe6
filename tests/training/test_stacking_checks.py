"""``--base-adapter`` and ``bundle eval --adapter`` refuse what cannot work, before any work.

A chat (sft) adapter is no base for an embedding adapter and has no retrieval
figures to measure; a base adapter that adapts other layers cannot be stacked:
each is a clear error before training starts, not after the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.errors import ConfigError
from mongars_llm.training import build_bundle

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bundle_args, tiny_base: Path, colours_file_shared: Path, make_pairs):
    """A registered chat adapter (``chat-qa``) and an embedding one on ``q_proj`` only
    (``search-q``), one step each; returns ``(root, pairs file, chat run, search run)``."""
    import json

    root = tmp_path_factory.mktemp("stack")
    rows, _ = make_pairs(24, 0)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = build_bundle(
        **bundle_args(tiny_base, colours_file_shared, root),
        run_name="chat-qa",
        max_steps=1,
    )
    search = build_bundle(
        **bundle_args(tiny_base, pairs, root),
        objective="contrastive",
        run_name="search-q",
        max_steps=1,
        batch_size=8,
        lora_r=4,
        target_modules=["q_proj"],
        eval_fraction=0.0,
    )
    return root, pairs, chat, search


@pytest.mark.parametrize("by", ["name", "folder"])
def test_a_chat_adapter_is_refused_as_an_embedding_base(
    adapters, bundle_args, tiny_base: Path, by: str
) -> None:
    root, pairs, chat, _search = adapters
    reference = "chat-qa" if by == "name" else str(chat.adapter_dir)
    run_name = f"on-chat-{by}"
    with pytest.raises(ConfigError, match=r"chat adapter.*use.*all") as caught:
        build_bundle(
            **bundle_args(tiny_base, pairs, root),
            objective="contrastive",
            base_adapter=reference,
            run_name=run_name,
            max_steps=1,
            batch_size=8,
        )
    assert "mntp" in str(caught.value)  # what it takes instead
    assert not (root / "runs" / run_name).exists()  # refused before the run started


def test_a_base_adapter_with_other_layers_is_refused_before_training(
    adapters, bundle_args, tiny_base: Path
) -> None:
    root, pairs, _chat, _search = adapters
    with pytest.raises(ConfigError, match=r"adapt(s)? different layers.*target_modules") as err:
        build_bundle(
            **bundle_args(tiny_base, pairs, root),
            objective="contrastive",
            base_adapter="search-q",
            run_name="other-layers",
            target_modules=["v_proj"],
            max_steps=40,
            save_steps=1,
            batch_size=8,
            eval_fraction=0.0,
        )
    assert "q_proj" in str(err.value)
    run_dir = root / "runs" / "other-layers"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "train_log.jsonl").exists()


@pytest.mark.parametrize("by", ["name", "folder"])
def test_bundle_eval_refuses_a_chat_adapter(adapters, tiny_base: Path, capsys, by: str) -> None:
    root, pairs, chat, _search = adapters
    reference = "chat-qa" if by == "name" else str(chat.adapter_dir)
    argv = [
        "bundle",
        "eval",
        "--dataset-path",
        str(pairs),
        "--base-model",
        str(tiny_base),
        "--registry-path",
        str(root / "registry"),
        "--device",
        "cpu",
        "--adapter",
        reference,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chat adapter" in err and "embedding adapter" in err
    assert "Traceback" not in err
