"""A run folder belongs to one build: concurrent builds never overwrite each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.errors import BundleError
from mongars_llm.registry import AdapterRegistry
from mongars_llm.training import build_bundle

pytestmark = pytest.mark.train


def test_two_builds_of_one_run_name_at_once_one_wins_and_its_version_stays_valid(
    tiny_base: Path, colours_file: Path, tmp_path: Path
) -> None:
    registry_dir = tmp_path / "registry"
    argv = [
        sys.executable,
        "-m",
        "mongars_llm",
        "bundle",
        "build",
        "--dataset-path",
        str(colours_file),
        "--base-model",
        str(tiny_base),
        "--registry-path",
        str(registry_dir),
        "--run-name",
        "same",
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(proc.wait(timeout=600), *proc.communicate()) for proc in procs]

    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], [err[-2000:] for _, _, err in results]
    (loser_err,) = [err for code, _, err in results if code == 1]
    run_dir = (registry_dir / "runs" / "same").resolve()
    assert "Traceback" not in loser_err
    (line,) = loser_err.strip().splitlines()
    assert str(run_dir) in line and "--run-name" in line
    # the loser prints one JSON document too, and says why
    (loser_out,) = [out for code, out, _ in results if code == 1]
    assert json.loads(loser_out)["error_type"] == "BundleError"

    registry = AdapterRegistry(registry_dir)
    (entry,) = registry.list()  # one build registered; nothing overwrote its files
    registry.verify(entry)
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["registry"]["version"] == entry.version

    # a finished, registered bundle is never trained into again, even with --resume
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(BundleError, match="already holds a finished bundle") as info:
        build_bundle(
            dataset_path=colours_file,
            base_model=str(tiny_base),
            registry_path=registry_dir,
            run_name="same",
            max_steps=12,
            save_steps=3,
            batch_size=4,
            max_seq_len=64,
            resume=True,
            progress=False,
        )
    assert "--run-name" in str(info.value)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    registry.verify(entry)
