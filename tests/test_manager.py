"""ModelManager: active profile precedence, resolved roles, describe(), provisioning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mongars_llm import ModelManager
from mongars_llm.errors import ConfigError, UnknownProfileError, UnknownRoleError
from mongars_llm.manifest import builtin_manifest, parse_manifest
from mongars_llm.settings import ModelSettings, Settings

PROFILES = {name: {"models": {"general": f"org/{name}"}} for name in ("alpha", "beta", "gamma")}


@pytest.fixture(autouse=True)
def _no_profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PROFILE", "MONGARS_LLM_MODELS_PATH"):
        monkeypatch.delenv(name, raising=False)


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def _manifest(profiles: dict[str, Any] | None = None) -> Any:
    return parse_manifest({"profiles": profiles or {**PROFILES, "default": PROFILES["alpha"]}})


def test_profile_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """argument > a profile the Settings name > LLM_MODELS_PROFILE > MONGARS_... > default."""
    manifest = _manifest()
    explicit = _settings(llm_models_profile="gamma")
    assert ModelManager(manifest, settings=_settings()).profile_name == "default"
    assert ModelManager(manifest, settings=explicit).profile_name == "gamma"
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "beta")
    assert ModelManager(manifest, settings=_settings()).profile_name == "beta"
    monkeypatch.setenv("LLM_MODELS_PROFILE", "alpha")
    assert ModelManager(manifest, settings=_settings()).profile_name == "alpha"
    # settings that name a profile in code beat the environment, as every setting does
    assert ModelManager(manifest, settings=explicit).profile_name == "gamma"
    assert ModelManager(manifest, settings=_settings(llm_models_profile="gamma")).profile_name == (
        "gamma"
    )
    # settings read before the variable was set, that name no profile: the environment counts
    monkeypatch.delenv("LLM_MODELS_PROFILE")
    monkeypatch.delenv("MONGARS_LLM_MODELS_PROFILE")
    unnamed = _settings()
    monkeypatch.setenv("LLM_MODELS_PROFILE", "alpha")
    assert ModelManager(manifest, settings=unnamed).profile_name == "alpha"
    manager = ModelManager(manifest, settings=explicit, profile="beta")
    assert manager.profile_name == "beta"
    assert manager.profile is manifest.profiles["beta"]
    assert manager.role("general").name == "org/beta"


def test_unknown_profile_lists_the_available_ones_with_a_hint() -> None:
    with pytest.raises(UnknownProfileError) as info:
        ModelManager(_manifest(), settings=_settings(), profile="gamme")
    error = info.value
    assert isinstance(error, ConfigError) and isinstance(error, LookupError)
    assert error.available == ["alpha", "beta", "default", "gamma"]
    assert "available profiles: alpha, beta, default, gamma" in str(error)
    assert "Did you mean 'gamma'?" in str(error)


def test_unknown_profile_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODELS_PROFILE", "prod")
    with pytest.raises(UnknownProfileError, match="unknown profile 'prod'"):
        ModelManager(builtin_manifest(), settings=_settings())


def test_roles_are_validated_before_any_is_resolved() -> None:
    manager = ModelManager(builtin_manifest(), settings=_settings(), profile="small")
    assert manager.role_names == ["general", "coding", "embedding"]
    assert [r.role for r in manager.roles()] == ["general", "coding", "embedding"]
    assert [r.role for r in manager.roles(["coding", "coding"])] == ["coding"]
    assert [r.role for r in manager.roles("embedding")] == ["embedding"]
    with pytest.raises(UnknownRoleError) as info:
        manager.roles(["general", "chat"])
    assert info.value.known == ["coding", "embedding", "general"]
    assert "unknown role 'chat' in profile 'small'" in str(info.value)
    with pytest.raises(UnknownRoleError):
        manager.role("chat")


def test_resolved_parameters_respect_the_global_bounds() -> None:
    manifest = parse_manifest(
        {
            "profiles": {
                "default": {
                    "models": {
                        "long": {"name": "m", "parameters": {"max_new_tokens": 4000, "top_p": 0.8}},
                        "ollama_style": {"name": "m", "parameters": {"num_predict": 50}},
                        "plain": "m",
                        "extras": {
                            "name": "m",
                            "parameters": {"stop": "###", "options": {"mirostat": 2}},
                            "embedding": {"max_length": 100000, "instruction": "Query: "},
                        },
                    }
                }
            }
        }
    )
    settings = _settings(model=ModelSettings(max_new_tokens=100, max_input_tokens=2048))
    manager = ModelManager(manifest, settings=settings)
    assert manager.role("long").parameters == {"top_p": 0.8, "max_new_tokens": 100}  # clamped
    assert manager.role("ollama_style").parameters == {"max_new_tokens": 50}  # folded in
    assert manager.role("plain").parameters == {"max_new_tokens": 100}  # the default
    extras = manager.role("extras")
    assert extras.parameters == {"max_new_tokens": 100, "stop": ["###"], "options": {"mirostat": 2}}
    assert extras.embedding == {
        "pooling": "mean",
        "bidirectional": False,
        "normalize": True,
        "max_length": 2048,
        "instruction": "Query: ",
    }
    assert manager.role("plain").embedding["max_length"] == 2048
    with pytest.raises(AttributeError):
        extras.role = "other"  # type: ignore[misc]


def test_describe_is_the_api_payload() -> None:
    settings = _settings(model=ModelSettings(max_new_tokens=300))
    manager = ModelManager(settings=settings, profile="default")  # built-in manifest
    payload = manager.describe()
    assert json.loads(json.dumps(payload)) == payload  # JSON-serialisable as is
    assert payload["manifest"] == "<built-in>"
    assert payload["active_profile"] == "default"
    profile = payload["profile"]
    assert profile["name"] == "default" and profile["description"]
    assert list(profile["roles"]) == ["general", "coding", "embedding"]
    general = profile["roles"]["general"]
    assert general["name"] == "dphn/Dolphin-X1-8B" and general["provider"] == "huggingface"
    assert general["parameters"] == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 300}
    assert general["trust_remote_code"] is False and general["adapters"] == []
    assert profile["roles"]["embedding"]["embedding"]["pooling"] == "mean"
    assert payload["profiles"] == [
        {
            "name": "default",
            "description": builtin_manifest().profiles["default"].description,
            "roles": ["general", "coding", "embedding"],
        },
        {
            "name": "smol",
            "description": builtin_manifest().profiles["smol"].description,
            "roles": ["general", "coding", "embedding"],
        },
        {
            "name": "small",
            "description": builtin_manifest().profiles["small"].description,
            "roles": ["general", "coding", "embedding"],
        },
    ]


def test_manager_loads_a_manifest_path_and_the_configured_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("profiles:\n  default:\n    models:\n      general: org/from-yaml\n")
    manager = ModelManager(str(path), settings=_settings())
    assert manager.describe()["manifest"] == str(path)
    assert manager.role("general").name == "org/from-yaml"
    configured = ModelManager(settings=_settings(llm_models_path=path))
    assert configured.manifest.source == path
    assert "models.yaml" in repr(configured)


def test_provision_takes_a_manager_and_ensure_models_installed_calls_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongars_llm import provision
    from mongars_llm.provisioning import clear_cache

    project = tmp_path / "project"
    (project / "checkpoints" / "tiny").mkdir(parents=True)
    (project / "checkpoints" / "tiny" / "config.json").write_text('{"model_type": "llama"}')
    manifest_path = project / "llm_models.json"
    manifest_path.write_text(
        json.dumps(
            {
                "profiles": {
                    "default": {
                        "models": {
                            "general": {"name": "checkpoints/tiny", "provider": "local"},
                            "missing": {"name": "checkpoints/absent", "provider": "local"},
                        }
                    }
                }
            }
        )
    )
    monkeypatch.chdir(tmp_path)  # relative names must not resolve against the cwd
    settings = _settings(cache_dir=tmp_path / "cache")
    manager = ModelManager(manifest_path, settings=settings)
    clear_cache()
    report = provision(manager=manager, show_progress=False)
    entries = {entry.role: entry for entry in report}
    assert entries["general"].action == "exists"
    assert Path(entries["general"].path) == (project / "checkpoints" / "tiny").resolve()
    assert entries["missing"].action == "failed"
    assert "does not exist" in (entries["missing"].error or "")
    only = manager.ensure_models_installed("general", force=True, show_progress=False)
    assert [entry.role for entry in only] == ["general"] and only.ok
    with pytest.raises(UnknownRoleError):
        manager.ensure_models_installed(["nope"])
