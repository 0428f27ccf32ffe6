"""`mongars-llm demo` runs the whole lifecycle offline, as the README promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_step_offline(tmp_path: Path) -> None:
    env_overrides = {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "demo", "--json", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env_overrides},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    steps = {step["name"]: step for step in report["steps"]}
    assert len(steps) == 8 and all(step["ok"] for step in steps.values())
    assert all(
        action == "exists" for action in steps["provision (local provider)"]["detail"].values()
    )
    chat = steps["chat + embed with one runtime"]["detail"]
    assert chat["one_copy_of_weights"] is True
    assert chat["embedding_shape"] == [3, 64]
    metrics = steps["validate dataset + LoRA fine-tune"]["detail"]["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    assert steps["registry -> runtime adapter"]["detail"]["latest"] == "1"
    assert steps["HTTP: OpenAI-compatible app"]["detail"]["chat_status"] == 200
    assert (tmp_path / "runs" / "demo" / "wrapper" / "config.json").is_file()


def test_demo_refuses_a_file_as_work_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mongars_llm.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--workdir", str(blocker)]) == 2
    assert "pass a folder to --workdir" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
