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
         "CHANGELOG.md", "pyproject.toml", "noxfile.py", ".gitignore", "hatch_build.py"]  # fmt: skip
#: what the sdist holds at its top level, and nothing else
_SDIST_TOP = {"src", "tests", "docs", "examples", "benchmarks", "README.md", "LICENSE",
              "CHANGELOG.md", "pyproject.toml", "noxfile.py", "hatch_build.py", "PKG-INFO",
              ".gitignore"}  # fmt: skip
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


def _need_build_tools() -> None:
    for module in ("build", "hatchling"):
        if importlib.util.find_spec(module) is None:
            reason = f"{module} is not installed: pip install build hatchling"
            if os.environ.get("MONGARS_TEST_STRICT") == "1":
                pytest.fail(reason)
            pytest.skip(reason)


def _copy_tree(tree: Path, names: list[str]) -> Path:
    root = Path(__file__).resolve().parents[1]
    for name in names:
        source = root / name
        if source.is_dir():
            shutil.copytree(
                source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(source, tree / name)
    return tree


def _build(tree: Path, out: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", *targets, "--outdir", str(out), "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_sdist_and_wheel_ship_the_license_and_no_stray_file(tmp_path: Path) -> None:
    """Built from a working tree holding secrets and local state (offline, no isolation)."""
    import tarfile
    import zipfile

    _need_build_tools()
    tree = _copy_tree(tmp_path / "tree", _TREE)
    for name, text in _STRAY.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)

    done = _build(tree, tmp_path / "dist")
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
    assert {name.split("/", 1)[0] for name in sdist_names} == _SDIST_TOP
    assert "src/mongars_llm/py.typed" in sdist_names
    assert "mongars_llm/py.typed" in wheel_names
    assert "mongars_llm/_data/" in "\n".join(wheel_names)  # package data ships


@pytest.mark.slow
def test_a_file_git_does_not_track_stops_the_sdist_build(tmp_path: Path) -> None:
    """In a git checkout, a scratch file in a shipped folder never ships silently."""
    import tarfile

    _need_build_tools()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tree = _copy_tree(tmp_path / "tree", _TREE)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=tree, check=True, env=env)
    scratch = tree / "src" / "mongars_llm" / "scratch_notes.py"
    scratch.write_text("TOKEN = 'my experiment'\n")
    ignored = tree / "src" / "mongars_llm" / ".env"  # ignored by git: excluded, not an error
    ignored.write_text("MONGARS_API_KEY=x\n")

    refused = _build(tree, tmp_path / "dist", "--sdist")
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "src/mongars_llm/scratch_notes.py" in output and "git add" in output
    assert "src/mongars_llm/.env" not in output
    assert not list((tmp_path / "dist").glob("*.tar.gz"))

    subprocess.run(["git", "add", str(scratch)], cwd=tree, check=True, env=env)
    done = _build(tree, tmp_path / "dist", "--sdist")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    assert "src/mongars_llm/scratch_notes.py" in names
    assert not [n for n in names if n.endswith(".env")]


def test_the_example_datasets_are_plain_copies_of_the_packaged_ones() -> None:
    """examples/data/ holds real files (a link into src/ breaks on a copy and on Windows),
    byte for byte the datasets the package ships (``mongars_llm.testing`` and the demo
    read those)."""
    from importlib.resources import files

    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    packaged = files("mongars_llm") / "_data"
    for name in ("product_qa.jsonl", "support_pairs.jsonl", "support_pairs_eval.jsonl"):
        copy = examples / name
        assert copy.is_file() and not copy.is_symlink(), f"{copy} must be a regular file"
        assert copy.read_bytes() == (packaged / name).read_bytes(), (
            f"{copy} differs from mongars_llm/_data/{name}: copy the packaged file over it"
        )
