"""``MONGARS_HOME``: one root for every directory, below each directory's own variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.settings import Settings


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MONGARS_"):
            monkeypatch.delenv(name)


def test_home_moves_every_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("MONGARS_HOME", str(tmp_path / "home"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.cache_dir == tmp_path / "home" / "cache"
    assert settings.resolved_models_dir == tmp_path / "home" / "cache" / "models"
    assert settings.llm_adapter_registry_path == tmp_path / "home" / "encoders"


def test_a_directory_variable_wins_over_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("MONGARS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MONGARS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH", str(tmp_path / "registry"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.cache_dir == tmp_path / "home" / "cache"
    assert settings.resolved_models_dir == tmp_path / "models"
    assert settings.llm_adapter_registry_path == tmp_path / "registry"
    # and a value given in code wins as well
    assert Settings(cache_dir=tmp_path / "c", _env_file=None).cache_dir == tmp_path / "c"  # type: ignore[call-arg]


def test_without_home_the_platform_dirs_follow_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if sys.platform != "linux":
        pytest.skip("XDG directories are a Linux convention")
    _clean_env(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.cache_dir == tmp_path / "xdg-cache" / "mongars-llm"
    assert settings.llm_adapter_registry_path == tmp_path / "xdg-data" / "mongars-llm" / "encoders"


def test_the_cli_uses_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGARS_")}
    env["MONGARS_HOME"] = str(tmp_path / "home")

    def run(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mongars_llm", *argv],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert json.loads(run("models", "list", "--installed", "--json"))["models_dir"] == str(
        tmp_path / "home" / "cache" / "models"
    )
    assert json.loads(run("adapters", "list", "--json"))["registry"] == str(
        tmp_path / "home" / "encoders"
    )
