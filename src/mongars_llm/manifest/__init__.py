"""Manifest of profiles and roles: schema, loading, validation and resolution.

A manifest maps profiles to roles, each role naming a model, a provider and
sampling defaults (DESIGN §1)::

    {"profiles": {"default": {"models": {"general": "dphn/Dolphin-X1-8B"}}}}

:func:`load_manifest` reads a JSON or YAML file (or falls back to the built-in
manifest), :func:`parse_manifest` validates an already decoded document, and
every problem is a :class:`~mongars_llm.errors.ManifestError` naming the file,
the JSON path and what was expected.
"""

from __future__ import annotations

from ..errors import ManifestError
from ._loader import (
    BUILTIN_SOURCE,
    builtin_manifest,
    load_manifest,
    manifest_problems,
    parse_manifest,
    read_manifest_document,
)
from ._problems import format_json_path
from ._resolve import ResolvedRole, resolve_role
from ._schema import manifest_json_schema
from .models import (
    AdapterSpec,
    EmbeddingOptions,
    Manifest,
    Profile,
    RoleEntry,
    SamplingParameters,
)
from .providers import known_providers, register_provider_name, unregister_provider_name

__all__ = [
    "BUILTIN_SOURCE",
    "AdapterSpec",
    "EmbeddingOptions",
    "Manifest",
    "ManifestError",
    "Profile",
    "ResolvedRole",
    "RoleEntry",
    "SamplingParameters",
    "builtin_manifest",
    "format_json_path",
    "known_providers",
    "load_manifest",
    "manifest_json_schema",
    "manifest_problems",
    "parse_manifest",
    "read_manifest_document",
    "register_provider_name",
    "resolve_role",
    "unregister_provider_name",
]
