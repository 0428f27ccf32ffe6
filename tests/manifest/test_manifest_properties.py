"""Property tests: any JSON document loads as a manifest or raises ManifestError with a path."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mongars_llm.errors import ManifestError
from mongars_llm.manifest import Manifest, builtin_manifest, manifest_json_schema, parse_manifest
from mongars_llm.manifest._problems import allowed_keys
from mongars_llm.manifest.models import (
    AdapterSpec,
    EmbeddingOptions,
    Profile,
    RoleEntry,
    SamplingParameters,
)

SOURCE = "prop/llm_models.json"

# every key the schema knows, so random objects often look almost right
VOCABULARY = sorted(
    {
        key
        for model in (
            Manifest,
            Profile,
            RoleEntry,
            SamplingParameters,
            EmbeddingOptions,
            AdapterSpec,
        )
        for key in allowed_keys(model)
    }
    | {"default", "small", "general", "coding", "embedding", "temprature", "source", "base_dir"}
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["huggingface", "local", "ollama", "mean", "all", "", " ", "\n", "a" * 65])
    | st.just("f" * 64)
)
keys = st.sampled_from(VOCABULARY) | st.text(max_size=10)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)

RICH_ROLE = {
    "name": "org/model",
    "provider": "local",
    "auto_download": False,
    "revision": "v1",
    "parameters": {"temperature": 0.1, "top_k": 5, "stop": ["\n"], "options": {"mirostat": 2}},
    "adapters": [
        {"name": "a", "source": "adapters/a", "use": "embed"},
        {"name": "b", "source": "https://example.org/b.tgz", "sha256": "0" * 64},
    ],
    "embedding": {"pooling": "eos_token", "bidirectional": True, "max_length": 128},
    "trust_remote_code": True,
    "description": "all fields",
}
VALID_DOCUMENTS = [
    json.loads(builtin_manifest().model_dump_json()),
    {"profiles": {"default": {"models": {"general": RICH_ROLE, "coding": "org/model"}}}},
]

_TOKEN = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def _split(json_path: str) -> list[Any]:
    """Parse a json_path back into keys and indices (and check it is well formed)."""
    parts: list[Any] = []
    position = 0
    while position < len(json_path):
        match = _TOKEN.match(json_path, position)
        assert match is not None and match.end() > position, f"malformed json_path {json_path!r}"
        name, index, quoted = match.groups()
        parts.append(
            name if name is not None else int(index) if index is not None else json.loads(quoted)
        )
        position = match.end()
    return parts


def _assert_well_reported(document: Any, error: ManifestError) -> None:
    assert error.source == SOURCE
    assert isinstance(error.json_path, str)
    assert str(error).startswith(SOURCE)
    parts = _split(error.json_path)
    node = document
    missing = error.reason.startswith("missing required key")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if last and missing:
            assert isinstance(node, dict) and part not in node
            break
        if isinstance(node, dict):
            assert part in node or str(part) in map(str, node), (error.json_path, document)
            node = (
                node[part]
                if part in node
                else next(v for k, v in node.items() if str(k) == str(part))
            )
        else:
            assert isinstance(node, list) and isinstance(part, int) and part < len(node)
            node = node[part]


def _check(document: Any) -> None:
    snapshot = copy.deepcopy(document)
    try:
        manifest = parse_manifest(document, source=SOURCE)
    except ManifestError as error:
        _assert_well_reported(document, error)
    else:
        assert isinstance(manifest, Manifest) and manifest.profiles
    assert document == snapshot or document != document  # never mutated (NaN != NaN)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_parses_or_raises_a_manifest_error(document: Any) -> None:
    _check(document)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values.map(lambda value: {"profiles": value}))
def test_any_profiles_value_parses_or_raises_a_manifest_error(document: Any) -> None:
    _check(document)


def _nodes(document: Any) -> list[list[Any]]:
    """Paths of every node of a document (the root is [])."""
    out: list[list[Any]] = [[]]
    stack: list[tuple[Any, list[Any]]] = [(document, [])]
    while stack:
        node, path = stack.pop()
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for key, value in items:
            out.append([*path, key])
            stack.append((value, [*path, key]))
    return out


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Any:
    document = copy.deepcopy(draw(st.sampled_from(VALID_DOCUMENTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _nodes(document)
        path = draw(st.sampled_from(paths))
        if not path:
            return draw(json_values) if draw(st.booleans()) else document
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add_key", "shorthand"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add_key" and isinstance(parent, dict):
            parent[draw(keys)] = draw(json_values)
        else:
            parent[path[-1]] = draw(st.text(max_size=8))
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_mutated_valid_manifests_parse_or_raise_a_manifest_error(document: Any) -> None:
    _check(document)


def test_valid_documents_do_parse() -> None:
    for document in VALID_DOCUMENTS:
        parse_manifest(document, source=SOURCE)


def test_deeply_nested_options_are_a_manifest_error_not_a_crash() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = {"level": [deep]}
    document = {
        "profiles": {
            "default": {"models": {"general": {"name": "m", "parameters": {"options": deep}}}}
        }
    }
    try:
        parse_manifest(document, source=SOURCE)
    except ManifestError as error:
        assert error.json_path == "profiles.default.models.general.parameters.options"
        assert "nested more than 32 levels" in error.reason
    else:
        raise AssertionError("a 10000-level document was accepted")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_the_json_schema_never_rejects_a_manifest_the_loader_accepts(document: Any) -> None:
    validator = Draft202012Validator(manifest_json_schema())
    try:
        parse_manifest(copy.deepcopy(document))
    except ManifestError:
        return
    errors = [e.message for e in validator.iter_errors(document)]
    assert not errors, errors
