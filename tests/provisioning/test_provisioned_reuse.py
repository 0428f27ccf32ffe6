"""Weights provisioned once are reused: ``from_pretrained(hub_id)`` and ``bundle build
--base-model hub_id`` load the copy in the models dir, with the Hub offline or gone.

Each load runs in a fresh process whose Hugging Face cache is empty, so only the
provisioned copy can satisfy it (huggingface_hub reads ``HF_HUB_OFFLINE`` and
``HF_ENDPOINT`` once, at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.provisioning import provision
from mongars_llm.provisioning._local_copy import provisioned_copy
from mongars_llm.settings import Settings

from .conftest import Olah, model_files, write_manifest

pytestmark = pytest.mark.network

LOAD = """
import json, sys
from mongars_llm import UnifiedLLMRuntime
rt = UnifiedLLMRuntime.from_pretrained(sys.argv[1], device="cpu", **json.loads(sys.argv[2]))
out = rt.generate("hello", max_new_tokens=2, temperature=0)
vec = rt.embed(["hello"])
print(json.dumps({"model_id": rt.model_id, "tokens": out.usage.completion_tokens,
                  "dim": int(vec.shape[1])}))
"""


def _env(tmp_path: Path, models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(
        HF_HOME=str(tmp_path / "empty-hf-home"),  # nothing in the Hugging Face cache
        MONGARS_MODELS_DIR=str(models_dir),
        MONGARS_CACHE_DIR=str(tmp_path / "mongars-cache"),
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def _load(repo_id: str, env: dict[str, str], **kwargs: object) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, repo_id, json.dumps(kwargs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _provision(settings: Settings, tmp_path: Path, model: object) -> str:
    manifest = write_manifest(tmp_path / "cfg", {"general": model})
    report = provision(manifest=manifest, profile="t", settings=settings, show_progress=False)
    entry = report["general"]
    assert report.ok, entry.error
    return str(entry.revision)


def test_from_pretrained_hub_id_loads_the_provisioned_copy_offline(
    hub_env: Olah, settings: Settings, tmp_path: Path
) -> None:
    commit = _provision(settings, tmp_path, "org/tiny")
    served = hub_env.downloads("org/tiny", "model.safetensors")

    result = _load("org/tiny", _env(tmp_path, settings.resolved_models_dir, HF_HUB_OFFLINE="1"))
    assert result["model_id"] == "org/tiny"  # the name the user gave, not the folder
    assert result["tokens"] == 2 and result["dim"] == 32
    assert hub_env.downloads("org/tiny", "model.safetensors") == served  # nothing fetched
    assert not (tmp_path / "empty-hf-home" / "hub" / "models--org--tiny").exists()

    found = provisioned_copy("org/tiny", settings=settings)
    assert found is not None and found.revision == commit


def test_revision_picks_the_matching_install_and_an_unknown_one_is_not_reused(
    hub_env: Olah, settings: Settings, tmp_path: Path
) -> None:
    first, second = hub_env.commits["org/tiny"]
    _provision(settings, tmp_path, {"name": "org/tiny", "revision": "v1"})
    assert provisioned_copy("org/tiny", revision="v1", settings=settings).revision == first  # type: ignore[union-attr]
    assert provisioned_copy("org/tiny", revision=first, settings=settings) is not None
    # never provisioned: main (refs/main absent) falls back to the newest install,
    # an explicit commit that is not installed is not reused
    assert provisioned_copy("org/tiny", settings=settings).revision == first  # type: ignore[union-attr]
    assert provisioned_copy("org/tiny", revision=second, settings=settings) is None
    assert provisioned_copy("org/other", settings=settings) is None
    # an interrupted install (no completion marker) never counts
    marker = settings.resolved_models_dir / "huggingface" / "org--tiny" / first
    (marker / ".mongars-complete.json").unlink()
    assert provisioned_copy("org/tiny", revision="v1", settings=settings) is None


@pytest.mark.train
def test_runtime_and_bundle_build_reuse_the_copy_with_the_hub_gone(
    olah_factory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server: Olah = olah_factory()
    server.add_repo("org/gone", [model_files(tiny_model_dir)])
    server.start()
    settings = Settings(
        models_dir=tmp_path / "models", cache_dir=tmp_path / "cache", _env_file=None
    )  # type: ignore[call-arg]
    os.environ["HF_ENDPOINT"] = server.url
    try:
        commit = _provision(settings, tmp_path, "org/gone")
    finally:
        del os.environ["HF_ENDPOINT"]
    server.stop()  # the Hub is gone; online mode, so only the provisioned copy can work

    env = _env(tmp_path, settings.resolved_models_dir, HF_ENDPOINT=server.url)
    assert _load("org/gone", env)["dim"] == 32

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}."}) + "\n" for i in range(8))
    )
    argv = [
        sys.executable,
        "-m",
        "mongars_llm",
        "bundle",
        "build",
        "--base-model",
        "org/gone",
        "--dataset-path",
        str(data),
        "--output-dir",
        str(tmp_path / "runs"),
        "--registry-path",
        str(tmp_path / "registry"),
        "--run-name",
        "reuse",
        "--max-steps",
        "1",
        "--json",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "reuse" / "run_metadata.json").read_text())
    assert meta["base_model"] == {"id": "org/gone", "revision": commit}
    adapter = json.loads(
        (tmp_path / "runs" / "reuse" / "adapter" / "adapter_config.json").read_text()
    )
    assert adapter["base_model_name_or_path"] == "org/gone"
