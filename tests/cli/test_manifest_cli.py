"""`mongars-llm manifest validate|schema` and `mongars-llm models list|show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mongars_llm.cli import main
from mongars_llm.manifest import manifest_json_schema

GOOD_YAML = """\
profiles:
  default:
    models:
      general:
        name: org/chat
        parameters: {temperature: 0.4, max_new_tokens: 100000}
      embedding: org/embed
  laptop:
    description: small things
    models:
      general: {name: checkpoints/tiny, provider: local, revision: main}
"""

TYPO_JSON = {
    "profiles": {
        "default": {
            "models": {
                "general": {"name": "org/chat", "parameters": {"temprature": 0.2, "top_p": 9}}
            }
        }
    }
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no configs/llm_models.json here: the built-in manifest
    import mongars_llm.settings

    # fresh process-wide settings for this test; the previous ones come back afterwards
    monkeypatch.setattr(mongars_llm.settings, "_settings", None)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "cfg" / "llm_models.yaml"
    path.parent.mkdir()
    path.write_text(GOOD_YAML)
    return path


@pytest.fixture
def typo(tmp_path: Path) -> Path:
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(TYPO_JSON))
    return path


def test_validate_a_good_file(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "validate", str(good)]) == 0
    out, err = capsys.readouterr()
    assert f"{good}: valid" in out
    assert "default (general, embedding)" in out and "laptop (general)" in out
    # the local checkpoint does not exist yet: a warning, not a failure
    assert "laptop.models.general.name" in err and "does not exist" in err


def test_validate_a_bad_file_names_the_path_and_suggests(
    typo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", "validate", str(typo)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{typo} is not a valid manifest (2 problems)" in err
    assert (
        f"{typo}: profiles.default.models.general.parameters.temprature: unknown key "
        "'temprature'; did you mean 'temperature'?"
    ) in err
    assert "profiles.default.models.general.parameters.top_p: invalid value 9" in err


def test_validate_json_output(typo: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "validate", "--manifest", str(typo), "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert err == ""
    assert report["valid"] is False and report["manifest"] == str(typo)
    assert [p["json_path"] for p in report["problems"]] == [
        "profiles.default.models.general.parameters.temprature",
        "profiles.default.models.general.parameters.top_p",
    ]
    assert "did you mean 'temperature'?" in report["problems"][0]["message"]

    assert main(["manifest", "validate", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and report["problems"] == []
    assert report["profiles"] == {"default": ["general", "embedding"], "laptop": ["general"]}
    assert [w["json_path"] for w in report["warnings"]] == ["profiles.laptop.models.general.name"]


def test_validate_without_a_path_checks_the_builtin_manifest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["manifest", "validate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"] == "<built-in>" and report["valid"] is True
    assert set(report["profiles"]) == {"default", "smol", "small"}


def test_validate_missing_file_and_syntax_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", "validate", str(tmp_path / "absent.json")]) == 2
    assert "absent.json: manifest file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles:\n  default: [\n")
    assert main(["manifest", "validate", str(broken)]) == 2
    assert "invalid YAML at line 3, column 1" in capsys.readouterr().err


def test_schema_to_stdout_and_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest_json_schema()
    target = tmp_path / "schemas" / "llm_models.schema.json"
    assert main(["manifest", "schema", "--output", str(target)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and str(target) in err
    assert json.loads(target.read_text()) == manifest_json_schema()


def test_models_list(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--manifest", str(good)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"manifest: {good}   active profile: default"
    assert lines[1].split() == ["PROFILE", "ROLE", "MODEL", "PROVIDER"]
    assert lines[2].split() == ["*", "default", "general", "org/chat", "huggingface"]
    assert lines[4].split() == ["laptop", "general", "checkpoints/tiny@main", "local"]

    assert main(["models", "list", "--manifest", str(good), "--profile", "laptop", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["active_profile"] == "laptop"
    assert listing["profiles"] == [
        {
            "name": "laptop",
            "description": "small things",
            "active": True,
            "roles": {
                "general": {"name": "checkpoints/tiny", "provider": "local", "revision": "main"}
            },
        }
    ]


def test_models_show(
    good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MONGARS_MODEL__MAX_NEW_TOKENS", "256")
    from mongars_llm.settings import get_settings

    get_settings(reload=True)
    assert main(["models", "show", "general", "--manifest", str(good), "--json"]) == 0
    role = json.loads(capsys.readouterr().out)
    assert role["parameters"] == {"temperature": 0.4, "max_new_tokens": 256}  # clamped
    assert main(["models", "show", "--manifest", str(good)]) == 0
    out = capsys.readouterr().out
    assert "general: org/chat (huggingface)" in out and "embedding: org/embed" in out
    assert any(line.split() == ["max_new_tokens", "256"] for line in out.splitlines())

    monkeypatch.setenv("LLM_MODELS_PROFILE", "small")
    assert main(["models", "show", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["active_profile"] == "small" and payload["manifest"] == "<built-in>"


def test_models_errors_exit_2(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", "--manifest", str(good), "--profile", "lapto"]) == 2
    assert "Did you mean 'laptop'?" in capsys.readouterr().err
    assert main(["models", "show", "chat", "--manifest", str(good)]) == 2
    assert "known roles: embedding, general" in capsys.readouterr().err


def test_python_dash_m_validate_in_a_subprocess(typo: Path, good: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGARS_", "LLM_MODELS"))}
    bad = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "manifest", "validate", str(typo)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stdout == ""
    assert "did you mean 'temperature'?" in bad.stderr and str(typo) in bad.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "mongars_llm", "manifest", "validate", str(good), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
