"""``--resume`` never runs code from a checkpoint folder, and refuses a changed run.

A checkpoint stores its RNG states as JSON (no pickle); the fingerprint of the
run (every setting that changes the result) is checked before any file of the
checkpoint is loaded, and a changed setting is named; old checkpoints with a
pickled ``rng_state.pt`` are refused with a way forward, never unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.errors import BundleError
from mongars_llm.training import build_bundle

pytestmark = pytest.mark.train


class _WritesAFile:
    """A pickle payload: unpickling it creates ``marker`` (as a real attack runs code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, bundle_args, tiny_base: Path, colours_file_shared: Path):
    """A 4-step chat run with a checkpoint at step 2; returns ``(knobs, checkpoint)``."""
    root = tmp_path_factory.mktemp("resume")
    knobs = bundle_args(
        tiny_base,
        colours_file_shared,
        root,
        batch_size=4,
        max_steps=4,
        save_steps=2,
        lora_dropout=0.1,
        register_adapter=False,
    )
    result = build_bundle(**knobs, run_name="source")
    return knobs, result.run_dir / "checkpoints" / "step-00000002"


def _copy(checkpoint: Path, root: Path) -> Path:
    target = root / "crafted" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def test_a_crafted_pickle_in_a_checkpoint_never_runs(checkpointed, tmp_path: Path) -> None:
    import torch

    knobs, checkpoint = checkpointed
    crafted = _copy(checkpoint, tmp_path)
    for old in crafted.glob("rng_state*"):
        old.unlink()
    marker = tmp_path / "pwned"
    torch.save(_WritesAFile(marker), crafted / "rng_state.pt")

    with pytest.raises(BundleError) as caught:
        build_bundle(**knobs, run_name="victim", resume=crafted)
    assert not marker.exists(), "the checkpoint's pickle was unpickled"
    message = str(caught.value)
    # old-format checkpoints are refused with the way forward
    assert "rng_state.pt" in message and "never loaded" in message
    assert "without --resume" in message
    assert not (knobs["output_dir"] / "victim" / "run_metadata.json").exists()


def test_checkpoints_hold_no_pickled_rng_state(checkpointed) -> None:
    _knobs, checkpoint = checkpointed
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "rng_state.json" in names and not any(n.endswith(".pt") and "rng" in n for n in names)
    state = json.loads((checkpoint / "rng_state.json").read_text())
    assert set(state) >= {"python", "numpy", "torch"}


def test_a_damaged_rng_state_is_a_clear_error(checkpointed, tmp_path: Path) -> None:
    knobs, checkpoint = checkpointed
    crafted = _copy(checkpoint, tmp_path)
    (crafted / "rng_state.json").write_text('{"python": {"version": 3}}')
    with pytest.raises(BundleError, match=r"rng_state\.json is not a valid RNG state.*damaged"):
        build_bundle(**knobs, run_name="damaged", resume=crafted)


def test_a_resume_with_changed_settings_is_refused_naming_them(checkpointed) -> None:
    knobs, checkpoint = checkpointed
    changed = {
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "max_seq_len": 48,
    }
    with pytest.raises(BundleError, match="changed since it was written") as caught:
        build_bundle(**{**knobs, **changed}, run_name="changed", resume=checkpoint)
    message = str(caught.value)
    for field in changed:
        assert field in message, (field, message)
    assert "lora_alpha: 16 -> 32" in message
    # one setting alone is refused too (each one silently changed the run before)
    for field, value in changed.items():
        with pytest.raises(BundleError, match=field):
            build_bundle(**{**knobs, field: value}, run_name=f"one-{field}", resume=checkpoint)


def test_lora_r_changed_on_resume_is_a_one_line_error(checkpointed, capsys) -> None:
    knobs, checkpoint = checkpointed
    argv = [
        "bundle",
        "build",
        "--dataset-path",
        str(knobs["dataset_path"]),
        "--base-model",
        knobs["base_model"],
        "--output-dir",
        str(knobs["output_dir"]),
        "--registry-path",
        str(knobs["registry_path"]),
        "--max-seq-len",
        "64",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--lora-dropout",
        "0.1",
        "--lora-r",
        "4",
        "--no-register",
        "--run-name",
        "rank-4",
        "--resume",
        str(checkpoint),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "lora_r: 8 -> 4" in err and str(checkpoint) in err


def test_the_embedding_instruction_is_part_of_the_fingerprint(
    tmp_path: Path, bundle_args, tiny_base: Path, make_pairs, jsonl
) -> None:
    rows, _ = make_pairs(24, 0)
    pairs = jsonl(tmp_path / "pairs.jsonl", rows)
    knobs = bundle_args(
        tiny_base,
        pairs,
        tmp_path,
        objective="contrastive",
        batch_size=8,
        max_steps=2,
        save_steps=1,
        eval_fraction=0.0,
        register_adapter=False,
        lora_r=4,
        target_modules=["q_proj"],
        instruction="Find the passage",
    )
    result = build_bundle(**knobs, run_name="embed")
    checkpoint = result.run_dir / "checkpoints" / "step-00000001"
    with pytest.raises(BundleError, match="instruction: 'Find the passage' -> 'Retrieve'"):
        build_bundle(**{**knobs, "instruction": "Retrieve"}, run_name="embed-2", resume=checkpoint)
