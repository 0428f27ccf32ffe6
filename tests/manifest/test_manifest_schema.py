"""The exported JSON Schema agrees with the validator editors and CI will not run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from mongars_llm.errors import ManifestError
from mongars_llm.manifest import manifest_json_schema, parse_manifest
from mongars_llm.manifest._loader import BUILTIN_RESOURCE

RICH_ROLE = {
    "name": "checkpoints/tiny",
    "provider": "local",
    "auto_download": False,
    "revision": "v1",
    "parameters": {"temperature": 0, "top_k": 5, "stop": "\n", "seed": 7, "options": {"x": [1]}},
    "adapters": [
        {"name": "a", "source": "adapters/a", "use": "embed"},
        {"name": "b", "source": "https://example.org/b.tgz", "sha256": "0" * 64},
    ],
    "embedding": {"pooling": "eos_token", "bidirectional": True, "max_length": 128},
    "trust_remote_code": True,
    "description": "every field",
}


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = manifest_json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_schema_describes_the_file_not_the_loader(validator: Draft202012Validator) -> None:
    schema = manifest_json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["title"] and schema["description"]
    assert set(schema["properties"]) == {"$schema", "profiles"}  # no source/base_dir
    assert schema["required"] == ["profiles"]
    role = schema["$defs"]["RoleEntry"]
    assert role["additionalProperties"] is False
    assert all(p.get("description") for p in role["properties"].values())
    schema["title"] = "changed"
    assert manifest_json_schema()["title"] != "changed"  # callers get their own copy


def test_builtin_and_rich_manifests_match_the_schema(validator: Draft202012Validator) -> None:
    from importlib import resources

    builtin = json.loads(
        (resources.files("mongars_llm.manifest") / BUILTIN_RESOURCE).read_text(encoding="utf-8")
    )
    validator.validate(builtin)
    rich = {
        "$schema": "./schema.json",
        "profiles": {"p": {"models": {"general": RICH_ROLE, "coding": "org/model"}}},
    }
    validator.validate(rich)
    parse_manifest(rich)


@pytest.mark.parametrize(
    "role",
    [
        {"name": "m", "parameters": {"temprature": 1}},
        {"name": "m", "parameters": {"top_p": "0.9"}},
        {"name": "m", "parameters": {"top_p": 2}},
        {"name": "m", "embedding": {"pooling": "max"}},
        {"name": "m", "adapters": [{"name": "a", "sha256": "xyz"}]},
        {"provider": "local"},
        7,
        "",
    ],
)
def test_schema_rejects_what_the_loader_rejects(validator: Draft202012Validator, role: Any) -> None:
    document = {"profiles": {"default": {"models": {"general": role}}}}
    assert not validator.is_valid(document)
    with pytest.raises(ManifestError):
        parse_manifest(document)


def test_schema_rejects_bad_names(validator: Draft202012Validator) -> None:
    assert not validator.is_valid({"profiles": {"my profile": {"models": {"general": "m"}}}})
    assert not validator.is_valid({"profiles": {}})
