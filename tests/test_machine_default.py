"""With no profile chosen, a machine without CUDA uses a small built-in profile, not
the 8B ``default``; anything the user chose wins, and a user's manifest is never
second-guessed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm import ModelManager
from mongars_llm._machine import cuda_expected, smol_available
from mongars_llm.settings import Settings

pytestmark = pytest.mark.skipif(
    cuda_expected(), reason="checks the choice made on machines without CUDA"
)

SMALL = "smol" if smol_available() else "small"


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """No manifest file, no profile in the environment: the built-in manifest."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "LLM_MODELS_PROFILE",
        "MONGARS_LLM_MODELS_PROFILE",
        "MONGARS_LLM_MODELS_PATH",
        "MONGARS_MODEL__DEVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_no_cuda_and_no_choice_uses_the_small_builtin_profile(bare: Settings) -> None:
    manager = ModelManager(settings=bare)
    assert manager.profile_name == SMALL
    assert "Dolphin" not in json.dumps(manager.describe()["profile"])
    assert manager.profile_reason and "no CUDA" in manager.profile_reason


def test_every_way_of_choosing_a_profile_wins(
    bare: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ModelManager(settings=bare, profile="default").profile_name == "default"
    chosen = Settings(llm_models_profile="default", _env_file=None)  # type: ignore[call-arg]
    assert ModelManager(settings=chosen).profile_name == "default"
    monkeypatch.setenv("LLM_MODELS_PROFILE", "default")
    manager = ModelManager(settings=bare)
    assert manager.profile_name == "default" and manager.profile_reason is None
    monkeypatch.delenv("LLM_MODELS_PROFILE")
    # the user's own manifest: its 'default' profile is what they meant
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"profiles": {"default": {"models": {"general": "org/big"}}}}))
    assert ModelManager(own, settings=bare).profile_name == "default"
    # asking for CUDA says the machine has it
    monkeypatch.setenv("MONGARS_MODEL__DEVICE", "cuda")
    assert ModelManager(settings=bare).profile_name == "default"


def test_doctor_reports_the_profile_a_bare_command_uses(bare: Settings, tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "MONGARS_MODEL__DEVICE")
    }
    done = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "doctor", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    profile = json.loads(done.stdout)["profile"]
    assert profile["active"] == SMALL and profile["manifest"] == "<built-in>"
    assert "no CUDA" in profile["reason"]
