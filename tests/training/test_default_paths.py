"""Where a bundle goes by default (the user data dir, never the working directory),
and a wrapper built from a relative base path that still loads from elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

from mongars_llm.settings import Settings, get_settings
from mongars_llm.training import BundleConfig, build_bundle


def test_registry_and_runs_default_to_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    expected = Path(platformdirs.user_data_dir("mongars-llm", appauthor=False)) / "encoders"
    assert settings.llm_adapter_registry_path == expected
    assert settings.llm_adapter_registry_path.is_absolute()

    # the bundle config follows the setting (runs under <registry>/runs)
    monkeypatch.setenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH", str(tmp_path / "reg"))
    get_settings(reload=True)
    try:
        config = BundleConfig(dataset_path=tmp_path / "d.jsonl")
        assert config.registry_path == tmp_path / "reg"
        assert config.resolved_output_dir() == tmp_path / "reg" / "runs"
    finally:
        monkeypatch.delenv("MONGARS_LLM_ADAPTER_REGISTRY_PATH")
        get_settings(reload=True)


LOAD_WRAPPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import mongars_wrapper
w = mongars_wrapper.Wrapper.load(device="cpu")
print(json.dumps({"dim": int(w.embed(["hello"]).shape[1])}))
"""


@pytest.mark.train
def test_a_wrapper_built_from_a_relative_base_path_loads_from_another_folder(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(tiny_base, project / "tiny-model")
    data = project / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}."}) + "\n" for i in range(8))
    )
    monkeypatch.chdir(project)
    result = build_bundle(
        dataset_path=data,
        base_model="./tiny-model",
        registry_path=project / "registry",
        run_name="rel",
        max_steps=1,
        progress=False,
    )
    config = json.loads((result.wrapper_dir / "config.json").read_text())
    assert config["base_model"]["id"] == str((project / "tiny-model").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WRAPPER, str(result.wrapper_dir)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["dim"] == 64
