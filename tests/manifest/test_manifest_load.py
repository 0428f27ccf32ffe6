"""Loading manifest files: JSON and YAML, syntax errors, relative paths, and fallbacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mongars_llm.errors import ManifestError
from mongars_llm.manifest import builtin_manifest, load_manifest
from mongars_llm.settings import Settings

YAML_MANIFEST = """\
# comments are the reason to pick YAML
profiles:
  default:
    description: local checkpoint
    models:
      general:
        name: checkpoints/tiny        # relative to this file's folder
        provider: local
        parameters:
          temperature: 0.3
          stop: ["</s>"]
        adapters:
          - name: support
            source: adapters/support
      embedding: checkpoints/tiny
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_yaml_and_json_files_load_to_the_same_manifest(tmp_path: Path) -> None:
    import yaml

    yaml_path = _write(tmp_path / "cfg" / "llm_models.yaml", YAML_MANIFEST)
    json_path = _write(
        tmp_path / "cfg" / "llm_models.json", json.dumps(yaml.safe_load(YAML_MANIFEST))
    )
    from_yaml, from_json = load_manifest(yaml_path), load_manifest(json_path)
    assert from_yaml.profiles == from_json.profiles
    assert from_yaml.source == yaml_path and from_json.source == json_path
    general = from_yaml.profiles["default"].models["general"]
    assert general.parameters.stop == ["</s>"] and general.provider == "local"


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "project" / "configs" / "llm_models.yml", YAML_MANIFEST)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = load_manifest(os.path.relpath(path, elsewhere))  # a relative path to the file too
    general = manifest.profiles["default"].models["general"]
    folder = (tmp_path / "project" / "configs").resolve()
    assert manifest.base_dir == folder
    assert manifest.resolve_path(general.name) == folder / "checkpoints" / "tiny"
    assert manifest.resolve_path(general.adapters[0].source or "") == folder / "adapters/support"
    assert manifest.resolve_path("/abs/model") == Path("/abs/model")


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("bad.json", '{"profiles": {"default": }', "invalid JSON at line 1, column 26"),
        ("bad.yaml", "profiles:\n  default:\n    models: [a\n", "invalid YAML at line 4, column 1"),
        ("tab.yaml", "profiles:\n\tdefault: {}\n", "invalid YAML at line 2, column 1"),
        ("empty.yaml", "# nothing yet\n", "the manifest is empty"),
        ("notes.txt", "profiles: {}", "unsupported manifest file type '.txt'"),
    ],
)
def test_unreadable_files_are_manifest_errors_with_a_position(
    tmp_path: Path, name: str, text: str, fragment: str
) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.source == str(path)
    assert fragment in str(info.value)


def test_duplicate_keys_are_reported_not_silently_dropped(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "dup.json",
        '{"profiles": {"default": {"models": {"general": "a", "coding": "b", "general": "c"}}}}',
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.json_path == "profiles.default.models.general"
    assert "duplicate key 'general'" in str(info.value)

    path = _write(
        tmp_path / "dup.yaml",
        "profiles:\n  default:\n    models:\n      general: a\n      general: b\n",
    )
    with pytest.raises(ManifestError, match=r"line 5, column 7: found duplicate key 'general'"):
        load_manifest(path)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "anchors.yaml",
        "profiles:\n"
        "  default:\n"
        "    models:\n"
        "      general: &general {name: org/m, parameters: {top_p: 0.5}}\n"
        "      coding:\n"
        "        <<: *general\n"
        "        description: same model\n",
    )
    coding = load_manifest(path).profiles["default"].models["coding"]
    assert (coding.name, coding.parameters.top_p, coding.description) == (
        "org/m",
        0.5,
        "same model",
    )


def test_validation_errors_in_a_file_name_it(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "llm_models.yaml",
        "profiles:\n  default:\n    models:\n      general:\n        name: x\n"
        "        parameters: {top_p: high}\n",
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: profiles.default.models.general.parameters.top_p:")


def test_an_explicit_path_that_does_not_exist_is_named_with_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ManifestError) as info:
        load_manifest(missing)
    assert info.value.source == str(missing)
    assert "not found" in str(info.value) and "check the path" in str(info.value)
    with pytest.raises(ManifestError, match="not a file"):
        load_manifest(tmp_path)


def test_encodings(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('{"profiles": "\xe9"}'.encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(path)
    bom = tmp_path / "bom.json"  # what some Windows editors write
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"profiles": {"default": {"models": {"general": "m"}}}}')
    assert list(load_manifest(bom).profiles) == ["default"]


def test_default_location_falls_back_to_the_builtin_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # configs/llm_models.json does not exist here
    monkeypatch.delenv("MONGARS_LLM_MODELS_PATH", raising=False)
    manifest = load_manifest(settings=_settings())
    assert manifest is builtin_manifest() and manifest.source is None

    _write(
        tmp_path / "configs" / "llm_models.json",
        json.dumps({"profiles": {"p": {"models": {"r": "m"}}}}),
    )
    manifest = load_manifest(settings=_settings())
    assert list(manifest.profiles) == ["p"]
    assert manifest.base_dir == (tmp_path / "configs").resolve()


def test_a_configured_path_that_does_not_exist_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "typo.yaml"
    monkeypatch.setenv("MONGARS_LLM_MODELS_PATH", str(missing))
    with pytest.raises(ManifestError) as info:
        load_manifest(settings=_settings())
    assert info.value.source == str(missing)
    assert "MONGARS_LLM_MODELS_PATH" in str(info.value)

    _write(missing, "profiles: {yaml: {models: {general: org/model}}}\n")
    assert list(load_manifest(settings=_settings()).profiles) == ["yaml"]
