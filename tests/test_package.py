"""The package surface: fast import without torch, lazy public API, settings."""

from __future__ import annotations

import json
import subprocess
import sys

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
    monkeypatch.delenv("LLM_MODELS_PROFILE", raising=False)
    monkeypatch.delenv("MONGARS_LLM_MODELS_PROFILE", raising=False)
    settings = Settings(llm_models_profile="from-settings")
    assert resolve_profile_name(None, settings) == "from-settings"
    monkeypatch.setenv("MONGARS_LLM_MODELS_PROFILE", "prefixed")
    assert resolve_profile_name(None, settings) == "prefixed"
    monkeypatch.setenv("LLM_MODELS_PROFILE", "plain")
    assert resolve_profile_name(None, settings) == "plain"
    assert resolve_profile_name("explicit", settings) == "explicit"
