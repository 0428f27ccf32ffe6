"""The package surface: fast import without torch, lazy public API, settings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mongars_llm
from mongars_llm import errors
from mongars_llm.settings import Settings, resolve_profile_name


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, mongars_llm; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'fastapi', 'ray') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves() -> None:
    for name in mongars_llm.__all__:
        assert getattr(mongars_llm, name) is not None, name


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mongars_llm.nope  # noqa: B018


def test_errors_are_catchable_as_builtins() -> None:
    assert issubclass(errors.ManifestError, ValueError)
    assert issubclass(errors.UnknownRoleError, LookupError)
    assert issubclass(errors.MissingExtraError, ImportError)
    assert issubclass(errors.ProvisionLockTimeout, TimeoutError)
    err = errors.ManifestError(
        "must be <= 1", source="m.json", json_path="profiles.a.models.b.parameters.top_p"
    )
    assert "m.json: profiles.a.models.b.parameters.top_p: must be <= 1" in str(err)
    assert (
        "did you mean 'small'"
        in str(errors.UnknownProfileError("smal", ["default", "small"], hint="small")).lower()
    )
    assert 'pip install "mongars-llm[serve]"' in str(errors.MissingExtraError("fastapi", "serve"))


def test_settings_from_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGARS_MODEL__QUANTIZE_4BIT", "false")
    monkeypatch.setenv("MONGARS_MODEL__MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("MONGARS_ADMIN_TOKEN", "s3cret-token")
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9999")
    settings = Settings()
    assert settings.model.quantize_4bit is False
    assert settings.model.max_new_tokens == 64
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(settings)
    assert "s3cret-token" not in json.dumps(settings.model_dump(mode="json"))
    assert settings.ollama_host == "http://127.0.0.1:9999"


def test_profile_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """argument > Settings(llm_models_profile=...) > LLM_MODELS_PROFILE > MONGARS_... > default"""
    monkeypatch.delenv("LLM_MODELS_PROFILE", raising=False)
    monkeypatch.delenv("MONGARS_LLM_MODELS_PROFILE", raising=False)
    named = Settings(_env_file=None, llm_models_profile="from-settings")  # type: ignore[call-arg]
    unnamed = Settings(_env_file=None)  # type: ignore[call-arg]
    assert resolve_profile_name(None, named) == "from-settings"
    assert resolve_profile_name(None, unnamed) == "default"
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "prefixed")
    assert resolve_profile_name(None, named) == "from-settings"  # code beats the environment
    assert resolve_profile_name(None, unnamed) == "prefixed"
    assert Settings(_env_file=None).llm_models_profile == "prefixed"  # type: ignore[call-arg]
    monkeypatch.setenv("LLM_MODELS_PROFILE", "plain")
    assert resolve_profile_name(None, named) == "from-settings"
    assert resolve_profile_name(None, unnamed) == "plain"
    assert resolve_profile_name(None, Settings(_env_file=None)) == "plain"  # type: ignore[call-arg]
    assert resolve_profile_name(None) == "plain"
    assert resolve_profile_name("explicit", named) == "explicit"


# ------------------------------------------------------------------ distributions
_TREE = ["src", "tests", "docs", "examples", "benchmarks", "README.md", "LICENSE",
         "CHANGELOG.md", "pyproject.toml", "noxfile.py", ".gitignore"]  # fmt: skip
_SECRET = f"hf_{os.urandom(12).hex()}"  # random: this file itself ships in the sdist
_STRAY = {
    ".env": f"MONGARS_HF_TOKEN={_SECRET}\n",
    ".env.local": f"MONGARS_ADMIN_TOKEN={_SECRET}\n",
    "mongars.lock.json": "{}\n",
    "models/encoders/manifest.json": "{}\n",
    "runs/r1/adapter/adapter_config.json": "{}\n",
    "configs/llm_models.json": "{}\n",
    "examples/.env": f"HF_TOKEN={_SECRET}\n",
    "examples/models/tiny/config.json": "{}\n",
    "src/mongars_llm/.env": f"MONGARS_API_KEY={_SECRET}\n",
}


@pytest.mark.slow
def test_sdist_and_wheel_ship_the_license_and_no_stray_file(tmp_path: Path) -> None:
    """Built from a working tree holding secrets and local state (offline, no isolation)."""
    import tarfile
    import zipfile

    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            reason = f"{module} is not installed: pip install build hatchling"
            if os.environ.get("MONGARS_TEST_STRICT") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    for name in _TREE:
        source = root / name
        if source.is_dir():
            shutil.copytree(
                source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(source, tree / name)
    for name, text in _STRAY.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)

    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with tarfile.open(sdist) as archive:
        sdist_names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
        sdist_text = b"".join(
            archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile()
        )
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        wheel_text = b"".join(archive.read(name) for name in wheel_names)

    assert "LICENSE" in sdist_names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_names)
    assert b"Apache License" in sdist_text and b"Version 2.0" in wheel_text
    for names, text in ((sdist_names, sdist_text), (wheel_names, wheel_text)):
        assert _SECRET.encode() not in text
        stray = [
            n
            for n in names
            if n.rsplit("/", 1)[-1].startswith(".env")
            or n.endswith("mongars.lock.json")
            or n.startswith(("models/", "runs/", "configs/", "examples/models/"))
        ]
        assert not stray, stray
    assert "src/mongars_llm/py.typed" in sdist_names
    assert "mongars_llm/py.typed" in wheel_names
    assert "mongars_llm/_data/" in "\n".join(wheel_names)  # package data ships
